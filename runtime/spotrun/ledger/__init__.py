"""The ledger: committed checkpoints as the TrainJob status records them, fenced.

The status fields a commit changes and the fence that guards them (status), which
checkpoints the ledger keeps (retention), and the sinks that write the record: status.json
for local mode and buckets (sink), the Kubernetes status subresource (kube_sink). It builds
on the checkpoint store and the lifecycle policy; it never imports torch.
"""
