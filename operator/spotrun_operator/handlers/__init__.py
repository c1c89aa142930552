"""The bodies of kopf's handlers; spotrun_operator.main only registers them."""
