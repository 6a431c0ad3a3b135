"""What every job runs on: the device mesh and its logical-axis sharding rules, several processes as one
job (jax.distributed), the command convention, the project's log lines, and the storage layer every file
goes through (a local path or a gs:// URL; imports no JAX, so data_prep uses it too).
"""
