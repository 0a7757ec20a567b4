"""What configuration a bench measures, printed by every bench at its start.

A figure means little without the configuration behind it: a bench that raises a cache above
the tenant count, freezes the heap or turns fsync off measures a service nobody runs.  Benches
measure the shipped configuration; :func:`describe` names every setting that differs from the
shipped default (so a bench that must change one says so in its output), whether the heap is
frozen, and the durability of the database behind it.
"""

from __future__ import annotations

import gc

from sandboxsec.settings import Settings

__all__ = ["describe"]

#: Settings that say where things are, not how the service behaves.
_PLACES = frozenset({"home", "database_url", "public_url", "log_level", "log_format",
                     "trust_dir", "tenant_key_dir"})


def describe(settings: Settings | None = None, *, database: str = "") -> str:
    """One line: ``configuration: shipped defaults`` or the settings that differ, then the
    garbage collector's state and ``database`` (e.g. "PostgreSQL 15, fsync on")."""
    changed = []
    if settings is not None:
        for name, field in Settings.model_fields.items():
            if name in _PLACES:
                continue
            value = getattr(settings, name)
            default = field.get_default(call_default_factory=True)
            if default is not None and value != default:
                changed.append(f"{name}={value!r}")
    what = ("shipped defaults" if not changed
            else "shipped defaults except " + ", ".join(sorted(changed)))
    gc_state = f"gc.freeze on ({gc.get_freeze_count()} objects)" if gc.get_freeze_count() \
        else "no gc.freeze"
    return "configuration: " + "; ".join(p for p in (what, gc_state, database) if p)
