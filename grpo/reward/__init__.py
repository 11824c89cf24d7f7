"""The reward layer: the Lambda contract. `runner` batches trajectories and scores them (local handler files
or a deployed Lambda), `workers` runs handler files in worker processes with the environment `environment` makes,
`lambda_client` invokes a Lambda by ARN."""
