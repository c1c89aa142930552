"""Membership: who forms the group of an attempt, and how the members learn it.

A warm recovery keeps the surviving replicas' processes (torch imported, state in memory)
and re-forms the group as a new, fenced attempt with a replacement for the lost member.
The lifecycle policy decides the membership and writes it in the status (record); each
pod's launcher watches the status for it and hands it to its live workers (watch); the
workers re-form the process group and restore the state from memory or a peer
(spotrun.train.regroup).
"""
