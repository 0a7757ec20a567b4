"""Build of the optional C extension; everything else is declared in pyproject.toml.

``sandboxsec.audit._native`` hashes audit export entries in bulk with OpenSSL's libcrypto
(headers: Debian ``libssl-dev``).  It is optional: when it does not compile, the install goes
on and the verifier runs the same checks in pure Python.  ``SANDBOXSEC_BUILD_NATIVE=0`` skips
it on purpose (the test that notices a missing build honours the same variable).
"""

import os

from setuptools import Extension, setup

native = [
    Extension(
        "sandboxsec.audit._native",
        ["sandboxsec/audit/_native.c"],
        libraries=["crypto"],
        optional=True,
    )
]

setup(ext_modules=[] if os.environ.get("SANDBOXSEC_BUILD_NATIVE") == "0" else native)
