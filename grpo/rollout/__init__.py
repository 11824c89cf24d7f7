"""The rollout layer: prompts in, a group of responses per prompt out. `prompts` (chat templates, the reasoning
split), `batch` (what a rollout returns and its packed tensor form), `generate` (the transformers decode loop),
`samplers` (the backends behind `engine.rollout.backend`), `vllm` (the colocated vLLM engine)."""
