"""The remote layer: Bedrock or any OpenAI-compatible endpoint (`client`), a remote model graded like a local
one (`evaluate`), reading run directories (`runs`), the parity check (`parity`) and plots (`plot`)."""
