// Stands in for the Tencent Cloud VPC SDK, which the Go module proxy here
// does not serve, so that flanneld (whose main links every backend) builds.
// Only the host-gw backend is used; the tencent-vpc one fails at start.
module github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc

go 1.22
