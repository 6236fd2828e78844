"""Simulators of the target APIs, served over real HTTP on 127.0.0.1 for tests and benchmarks.

Each simulator behaves like its real service (paging, error shapes, timestamp formats, quirks),
injects faults on demand (:class:`Faults`) and logs what it deleted, so a test can check what the
client did from the server's side. ``python -m reaper.simulators <target>`` runs one standalone.
"""

from reaper.simulators.aparavi import AparaviSimTask, AparaviSimulator, generate_aparavi_tasks
from reaper.simulators.base import Faults, SimulatorBase
from reaper.simulators.data_pipeline import DataPipelineSimulator, SimTask, generate_tasks
from reaper.simulators.huawei_dcs import DcsSimTask, HuaweiDcsSimulator, generate_dcs_tasks
from reaper.simulators.huawei_iotda import (
    HuaweiIotdaSimulator,
    IotdaSimTask,
    generate_iotda_tasks,
)

__all__ = [
    "AparaviSimTask",
    "AparaviSimulator",
    "DataPipelineSimulator",
    "DcsSimTask",
    "Faults",
    "HuaweiDcsSimulator",
    "HuaweiIotdaSimulator",
    "IotdaSimTask",
    "SimTask",
    "SimulatorBase",
    "generate_aparavi_tasks",
    "generate_dcs_tasks",
    "generate_iotda_tasks",
    "generate_tasks",
]
