"""The stand-in builder under the name tests and scripts use: `quantkit.standin` is its home (recipes and verify
build it too, so it is not test-only code).

    python -m quantkit.testing.standin OUT_DIR [--size real] [--seed 0]
"""

from quantkit.standin import (
    REAL,
    TINY,
    StandinSize,
    build_standin,
    main,
    real_config,
    weight_specs,
    write_weights,
)

__all__ = ["REAL", "TINY", "StandinSize", "build_standin", "main", "real_config", "weight_specs", "write_weights"]

if __name__ == "__main__":
    main()
