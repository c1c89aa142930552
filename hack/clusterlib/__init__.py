"""hack/cluster's code: the local Kubernetes of the tests, without Docker.

hack/cluster runs `cli.main`; see docs/cluster.md. Stdlib only, Python 3.11, importable by
path (hack/ on sys.path) without installing anything. Imports go one way, from the top:

    cli           the command line: subcommands, flags, exit codes
    controlplane  up, down, status of one run dir; the components' flags, the KWOK nodes
    node          the real node: containerd, CNI bridge, NAT, CoreDNS, fake-gcs-server, kubelet
    images        the real node's images (pause, dev runtime) built with umoci
    probes        HTTP health checks and API calls
    processes     commands, and the daemons of a run dir: start, find, stop
    pki           certificates (openssl) and kubeconfigs
    rundir        a run dir's layout and state.json, the record of what it started
    topology      the names and addresses every module above agrees on
    build         pinned versions, Go builds and the binary cache
    console       messages on stderr and the error type for the user

dev_node_job.py is not part of this chain: hack/dev-node-job runs it with the virtualenv's
Python (it needs PyYAML) to adapt a TrainJob to the real node. kwok-stages.yaml is KWOK's
configuration, which `up` copies into the run dir.
"""
