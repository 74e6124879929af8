"""One rank of the control-packet test (launched by tests/serving/test_controls.py under torchrun).

    torchrun --standalone --nproc_per_node=2 tests/support/control_worker.py DIR [--decode-rank]

The serving rank reads DIR/prompts.json and asks for each prompt in turn; every rank shares the
controls once per prompt, as a stream does once per tick, and writes what it got to
DIR/rank<R>.json, with the timeout of its cascade group (compute ranks).
"""

import argparse
import json
import sys
from pathlib import Path

from engine.serving.controls import Controls, share
from parallel.runtime import RankFailure, launched
from parallel.topology import ParallelConfig


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--decode-rank", action="store_true")
    args = parser.parse_args()
    prompts = json.loads((args.out / "prompts.json").read_text())
    try:
        with launched(ParallelConfig(decode_rank=args.decode_rank, timeout_s=7.0)) as topology:
            controls = Controls("a red circle moving left")
            seen = []
            for prompt in prompts:
                if topology.is_decoder:
                    controls.request_prompt(prompt)
                seen.append(share(controls, topology).prompt)
            result = {"prompts": seen}
            group = topology.cascade_group()
            if group is not None:
                backend = group._get_backend(topology.device)
                result["cascade_group_timeout_s"] = backend.options._timeout.total_seconds()
            (args.out / f"rank{topology.rank}.json").write_text(json.dumps(result))
    except RankFailure as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
