"""The training API in every worker: the session behind report() and get_checkpoint().

The session (session), the Checkpoint handle (checkpoint), the background writer process of
each rank (writer), process-group set-up (group), prepare_model (ddp), prepare_data_loader
(data), should_checkpoint's interval (cadence) and the worker entry of `launch --function`
(_function_worker). Importing this package loads nothing; its modules load torch.
"""
