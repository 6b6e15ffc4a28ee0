"""One host of a two-process job receives SIGTERM: both must stop at the same step.

Used by test_train_devices.py (jax.distributed must be set up before anything else runs): the
launcher's JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are in the environment.
Runs pretrain's preemption check on a loop of sleeps (the hosts at different speeds) and prints
`STOP <step>` where it says to save and exit.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from adjax import sharding  # noqa: E402


def main():
  sharding.maybe_initialize_distributed()
  import jax
  from adjax.pretrain.loop import _Preemption
  pid = jax.process_index()
  with _Preemption() as preemption:
    for step in range(1, 400):
      time.sleep(0.02 * (1 + 2 * pid))
      if pid == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)   # the scheduler signals this host only
      if preemption.due(step):
        print(f"STOP {step}", flush=True)
        break
    else:
      print("NEVER", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
