"""spotrun's Kubernetes operator: keeps every TrainJob's group of GPU pods running.

It reconciles by level: one kopf daemon per TrainJob observes the job's pods, StatefulSet
and nodes, asks the pure restart policy (`spotrun.lifecycle.plan`) what to do, and applies
the answer through one module (`apply`). It imports spotrun's light modules, never torch.
See docs/operator.md.
"""
