"""Build of the optional C extensions; everything else is declared in pyproject.toml.

Both use OpenSSL's libcrypto (headers: Debian ``libssl-dev``) and implement no primitive:

* ``sandboxsec.audit._native`` hashes audit export entries in bulk;
* ``sandboxsec.sessions._p256`` checks session-proof signatures (ECDSA P-256) on threads that
  do not hold the GIL, so the check runs while the action is decided.

They are optional: when one does not compile, the install goes on and the same checks run in
pure Python or with ``cryptography``.  ``SANDBOXSEC_BUILD_NATIVE=0`` skips them on purpose
(the tests that notice a missing build honour the same variable).
"""

import os

from setuptools import Extension, setup

native = [
    Extension(
        "sandboxsec.audit._native",
        ["sandboxsec/audit/_native.c"],
        libraries=["crypto"],
        optional=True,
    ),
    Extension(
        "sandboxsec.sessions._p256",
        ["sandboxsec/sessions/_p256.c"],
        libraries=["crypto"],
        optional=True,
    ),
]

setup(ext_modules=[] if os.environ.get("SANDBOXSEC_BUILD_NATIVE") == "0" else native)
