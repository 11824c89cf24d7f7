"""The training layer: `trainer` (one GRPO step, the job), `actor` (the clipped update), `validation`
(sample and grade held-out prompts), `metrics` (Bedrock names, sinks), `health` (training-health alarms),
`checkpoint`, `dry_run` (`grpo train --dry-run`: parameters, memory, steps)."""
