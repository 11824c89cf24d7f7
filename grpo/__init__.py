"""grpo: a local GRPO engine that mirrors Amazon Bedrock reinforcement fine-tuning (RFT)."""

import logging

__version__ = "0.1.0"

# Where bitsandbytes is installed, importing it (peft does, in every run) warns on AVX512-BF16 CPUs that the
# optional hub package `kernels` is missing; that kernel only serves the packed CPU inference layout that
# grpo.models turns off (`_unpack_on_cpu`), so the warning is noise. Set here, before anything imports peft.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
