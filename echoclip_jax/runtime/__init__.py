"""What every job runs on: the device mesh and its logical-axis sharding rules, several processes as one
job (jax.distributed), and the project's log lines.
"""
