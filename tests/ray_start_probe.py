"""Run by test_ray_start.py in a fresh interpreter: a tiny Minority Guidance recipe with every
stage on Ray (distributed.backend=ray), with a spy on ``ray.init`` that passes every call
through and records who called it and what Ray came up with. Prints one JSON line.

Usage: python tests/ray_start_probe.py OUTPUT_DIR OBJECT_STORE_GB
"""

import json
import sys

import ray

from debiaslab import plugins
from debiaslab.config import load_config
from debiaslab.experiment import run_experiment
from debiaslab.recipes import RECIPES

STARTS: list[dict] = []
_real_init = ray.init


def spy_init(*args, **kwargs):
    frame = sys._getframe(1)
    caller = frame.f_globals.get("__name__")
    stack = []
    while frame is not None:
        stack.append(frame.f_code.co_qualname)
        frame = frame.f_back
    out = _real_init(*args, **kwargs)
    node = ray._private.worker._global_node
    STARTS.append({"caller": caller, "stack": stack,
                   "dashboard": node.address_info.get("webui_url") if node else None,
                   "object_store_memory": ray.cluster_resources().get("object_store_memory"),
                   "temp_dir": node.get_temp_dir_path() if node else None,
                   "node_ip": ray.util.get_node_ip_address()})
    return out


def main(out: str, store_gb: str) -> None:
    ray.init = spy_init
    plugins.load()
    tiny = ["model.model_channels=16", "model.channel_mult=[1,2]",
            "model.attention_resolutions=[]", "model.head_channels=16", "train.device=cpu",
            "recipe=minority_guidance", "minority.distance=l2", "minority.num_classes=4",
            "minority.n_iter=1", "minority.images_per_forward=64",
            "sample.guidance=[{type: classifier, scale: 2.0, target: 3}]",
            "train.steps=2", "train.batch_size=16", "train.warmup_steps=1",
            "train.checkpoint_every=2", "classifier.train.steps=2",
            "classifier.train.batch_size=16", "classifier.train.checkpoint_every=2",
            "classifier.model.model_channels=16", "classifier.model.channel_mult=[1,2]",
            "classifier.model.attention_resolutions=[]", "classifier.model.head_channels=16",
            "sample.samplers=[ddim]", "sample.steps=2", "sample.num_samples=8",
            "sample.batch_size=8", "metrics.bootstrap=0", "distributed.backend=ray",
            "distributed.num_workers=1", "distributed.map_concurrency=1",
            f"distributed.object_store_memory_gb={store_gb}", f"output_dir={out}",
            "name=raystart", "tracking.experiment=raystart"]
    cfg = load_config(None, tiny)
    done = run_experiment(cfg, progress=False)
    stages = {s.name: s.fn.__qualname__ for s in RECIPES.get(cfg.recipe).stages}
    print(json.dumps({"starts": STARTS, "stages": stages,
                      "metrics": sorted(done.metrics)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
