"""Local mode: `spotrun run trainjob.yaml` on one machine, under the operator's lifecycle policy.

The TrainJob file (trainjob), the supervisor of replicas x nprocPerNode workers (supervisor),
replica exits as lifecycle observations (observe), fault injection (faults, _fault_worker),
live progress and the summary (progress), and `spotrun status` (status_command).
"""
