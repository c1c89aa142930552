"""The pod's supervisor: `spotrun launch`, which starts one pod's workers and speaks for them.

It forwards the preemption notice, maps worker exits to the pod's exit code and records
completion in the ledger. It never imports torch: the workers do (spotrun.train).
"""
