"""PILoT compression as a script, for `accelerate launch` (same arguments as `pilot-hf compress`).

    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/compress.py --config configs/smollm2_gpu.yaml
"""

import sys

from pilot_hf.commands import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
