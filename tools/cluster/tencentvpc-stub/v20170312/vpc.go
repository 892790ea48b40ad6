// Package vpc has the names flannel's tencent-vpc backend uses, and no cloud.
package vpc

import "errors"

var errNoCloud = errors.New("the Tencent Cloud VPC backend is not part of this build")

type Filter struct {
	Name   *string
	Values []*string
}

type Route struct {
	RouteId              *uint64
	DestinationCidrBlock *string
	GatewayType          *string
	GatewayId            *string
	RouteType            *string
	Enabled              *bool
}

type RouteTable struct {
	RouteTableId *string
	RouteSet     []*Route
}

type DescribeRouteTablesRequest struct{ Filters []*Filter }

type DescribeRouteTablesResult struct{ RouteTableSet []*RouteTable }

type DescribeRouteTablesResponse struct{ Response *DescribeRouteTablesResult }

type RoutesRequest struct {
	RouteTableId *string
	Routes       []*Route
}

type RoutesResponse struct{}

type Client struct{}

func NewClientWithSecretId(id, key, region string) (*Client, error) { return nil, errNoCloud }

func NewDescribeRouteTablesRequest() *DescribeRouteTablesRequest {
	return &DescribeRouteTablesRequest{}
}
func NewDeleteRoutesRequest() *RoutesRequest { return &RoutesRequest{} }
func NewCreateRoutesRequest() *RoutesRequest { return &RoutesRequest{} }

func (c *Client) DescribeRouteTables(*DescribeRouteTablesRequest) (*DescribeRouteTablesResponse, error) {
	return nil, errNoCloud
}
func (c *Client) DeleteRoutes(*RoutesRequest) (*RoutesResponse, error) { return nil, errNoCloud }
func (c *Client) CreateRoutes(*RoutesRequest) (*RoutesResponse, error) { return nil, errNoCloud }
