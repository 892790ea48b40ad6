"""Where the cluster's objects come from: manifest files (`manifests`, read
and checked; `files`, watched on disk) or the API server (`kube`, watched
with reflectors). Each yields one `lb.model.Cluster`."""
