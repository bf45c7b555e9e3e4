"""`mmpersona models`: the model registry."""

from __future__ import annotations

import typer

from .settings import emit, settings

app = typer.Typer(help="The model registry: which model serves each role.", no_args_is_help=True)


@app.command("list")
def models_list(ctx: typer.Context) -> None:
    """Each role, the model that serves it, and whether it is available locally (no download, no build)."""
    from ..models import ROLES, TINY_MODELS, model_status, resolve

    s = settings(ctx)
    rows = []
    for role in ROLES:
        spec = resolve(role, s.overrides.get(role), preset=s.preset)
        st = model_status(spec)
        rows.append({"role": role, "id": spec.id, "source": st.source, "available": st.available,
                     "location": st.location,
                     "ip_adapter": None if spec.ip_adapter is None else
                     f"{spec.ip_adapter.id}/{spec.ip_adapter.subfolder}/{spec.ip_adapter.weight_name}"})
    lines = [f"preset: {s.preset}", f"{'role':<9} {'available':<10} {'source':<6} id"]
    for r in rows:
        extra = f"  (+ IP-Adapter {r['ip_adapter']})" if r["ip_adapter"] else ""
        lines.append(f"{r['role']:<9} {'yes' if r['available'] else 'no':<10} {r['source']:<6} {r['id']}{extra}")
    lines.append("tiny models: " + ", ".join(m.id for m in TINY_MODELS.values()))
    emit(s, {"preset": s.preset, "roles": rows}, "\n".join(lines))


@app.command("build-tiny")
def models_build_tiny(ctx: typer.Context) -> None:
    """Build every tiny model into the cache (offline, seconds); already built ones are reused."""
    from ..models import TINY_MODELS, ensure_tiny

    s = settings(ctx)
    rows = []
    for name, entry in TINY_MODELS.items():
        path = ensure_tiny(name)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append({"id": entry.id, "role": entry.role, "path": str(path), "bytes": size})
    total = sum(r["bytes"] for r in rows)
    text = "\n".join(f"{r['id']:<16} {r['bytes'] / 1e6:6.2f} MB  {r['path']}" for r in rows)
    emit(s, {"models": rows, "total_bytes": total}, f"{text}\ntotal {total / 1e6:.2f} MB")
