"""``python -m geomrobust.bench``: see ``geomrobust/bench/__init__.py``."""

from geomrobust.bench import main

main()
