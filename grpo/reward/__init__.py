"""The reward layer: the Lambda contract. `runner` batches trajectories and scores them (local handler files
or a deployed Lambda), `workers` runs handler files in worker processes, `lambda_client` invokes a Lambda by ARN."""
