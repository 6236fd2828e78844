"""Rate-limit efficiency on the Huawei simulators only: ``bench.rate_limit`` for DCS and IoTDA."""

from __future__ import annotations

from bench.rate_limit import main

if __name__ == "__main__":
    main(["huawei_dcs", "huawei_iotda"])
