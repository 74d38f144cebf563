"""Run as a Ray job by tests/test_cluster.py: an actor recording `EvaluatorMetrics` the way a
mixture evaluator records them, so the dashboard's evaluator panels are checked against what a
real metrics endpoint exports. (Once pipeline/evaluate/actor.py records these metrics itself,
the main job exports them too and this stand-in only repeats it.)"""
import time

import ray

from pipeline.metrics import EvaluatorMetrics


@ray.remote(num_cpus=0)
class Evaluator:
    def __init__(self):
        self.metrics = EvaluatorMetrics("standin")

    def evaluate(self) -> int:
        with self.metrics.evaluating():
            time.sleep(0.05)
        return 1


if __name__ == "__main__":
    ray.init()
    evaluator = Evaluator.remote()
    deadline = time.time() + 60  # the test stops this job once it has read the metrics
    while time.time() < deadline:
        ray.get(evaluator.evaluate.remote())
        time.sleep(0.5)
