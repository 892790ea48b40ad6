"""The node agent: its typed `config`, the sync `loop`, the pod devices it
follows (`links`), Prometheus `metrics`, and the per-service health checks
(`healthcheck`), all served by one small `httpserver`."""
