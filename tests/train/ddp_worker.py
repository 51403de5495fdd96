"""Run by tests under torchrun: train a toy model for a few steps in every process, then the same run
interrupted after step 2 and resumed; rank 0 saves the weights and histories to ``sys.argv[1]``."""
import sys
from pathlib import Path

import torch

from trimkit.train import TrainConfig, train

TOY = str(Path(__file__).resolve().parents[1] / "models" / "toy_vlms.py") + ":two_stream"
DATA = "synthetic:truefalse?n=32"
RECIPE = '[[pass]]\nname = "smarttrim.tokens"\ntarget_ratio = 0.6\n'
STEPS = 4


def config(**kw) -> TrainConfig:
    return TrainConfig(batch_size=8, measure_every=0, calibrate=0, checkpoint_every=2, **kw)


def run(out_dir=None, resume=False, callback=None):
    return train(TOY, DATA, target_ratio=0.6, steps=STEPS, recipe=RECIPE, config=config(), out_dir=out_dir,
                 resume=resume, progress=False, callback=callback)


def stop_at_2(step, row):
    if step == 2:
        raise KeyboardInterrupt


def main(result_file: str, work: str) -> None:
    torch.set_num_threads(1)
    whole = run()
    try:
        run(Path(work) / "b", callback=stop_at_2)
    except KeyboardInterrupt:
        pass
    torch.distributed.barrier()
    resumed = run(Path(work) / "b", resume=True)
    if torch.distributed.get_rank() == 0:
        torch.save({"whole": {n: p.detach() for n, p in whole.model.named_parameters()},
                    "resumed": {n: p.detach() for n, p in resumed.model.named_parameters()},
                    "history": whole.history, "resumed_history": resumed.history,
                    "world": torch.distributed.get_world_size()}, result_file)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
