"""Install the streaming content proxy: packages, console script, twistd dropin, extras."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# One home for the version: the code states it in its User-Agent without a metadata look-up.
VERSION = re.search(
    r'^VERSION = "([^"]+)"$', (HERE / "downloaders" / "version.py").read_text(), re.M
).group(1)

setup(
    name="twisted-streamer",
    version=VERSION,
    description="A Twisted streaming content proxy and downloader for repository mirrors.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        "downloaders",
        "importer",
        "store",
        "streamer",
        # The twistd dropin: twisted/ and twisted/plugins/ have no __init__.py.
        "twisted.plugins",
    ],
    package_data={"twisted.plugins": ["streamer_plugin.py"]},
    install_requires=[
        "twisted[tls]>=23.10",
        "treq>=23.11",
        "service-identity>=23.1",
        "pyopenssl>=23.2",
        "attrs>=23.1",
        "prometheus-client>=0.17",
        "tqdm>=4.66",
        "httptools>=0.6",
        # The PostgreSQL catalog; the binary extra brings its own libpq.
        "psycopg[binary]>=3.1",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.2",
            "greenlet>=3",
            "trustme>=1.1",
            "ruff>=0.5",
            # The type check .ci/run makes; mypy-zope lets mypy read zope.interface.
            "mypy>=1.10",
            "mypy-zope>=1.0.5",
            "types-tqdm",
        ],
    },
    entry_points={"console_scripts": ["streamer = streamer.cli:run"]},
)
