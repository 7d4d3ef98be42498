from __future__ import annotations

import click

from loratool.cli._options import allow_pickle_option, input_path, json_option, quiet_option


@click.command()
@click.argument("path", type=click.Path())
@json_option
@allow_pickle_option
@quiet_option
def scan(path: str, as_json: bool, allow_pickle: bool, quiet: bool) -> int:
    """Admission check for an upload: pickle imports (read, never run), safetensors layout rules, format,
    family, the hashes hubs use and a content fingerprint of the deltas.

    Hashes: sha256 of each file (AutoV2: its first 10 digits), sha256 of the tensor data as kohya's
    sshs_model_hash, modelspec.hash_sha256 and Civitai's AutoV3 compute it. The fingerprint is the same
    for a kohya file and its diffusers or PEFT conversion and for fp32 and bf16 copies. Exit 0 when
    nothing is wrong, 1 with error findings, 2 when PATH cannot be read at all.

    \b
    Example: loratool scan upload.safetensors
    Example: loratool batch scan uploads/ > scan.ndjson
    """
    from loratool.cli._output import emit
    from loratool.ops.scan import scan as run

    path = input_path(path, quiet=quiet or as_json)
    report = run(path, allow_pickle=allow_pickle)
    return emit(report.to_dict(), _render_scan, as_json=as_json, quiet=quiet, code=0 if report.ok else 1)


def _render_scan(doc: dict) -> None:  # type: ignore[type-arg]
    lines = [f"{doc['path']}: {doc['format'] or 'unknown format'}"
             + (f", family {doc['model_family']}" if doc["model_family"] else "")
             + (f", family one of {', '.join(doc['family_tied'])}" if doc["family_tied"] else "")
             + (f", {doc['num_modules']} modules" if doc["num_modules"] is not None else "")]
    if doc["fingerprint"]:
        lines.append(f"fingerprint  {doc['fingerprint']}")
    for f in doc["files"]:
        lines.append(f"{f['path']}  {f['kind']}  sha256 {f['sha256']}")
        if f["tensor_sha256"]:
            lines.append(f"  tensor data sha256 {f['tensor_sha256']}  (AutoV3 {f['autov3']}, AutoV2 {f['autov2']})")
        for imp in f["pickle_imports"]:
            lines.append(f"  imports {imp['module']}.{imp['name']} x{imp['count']}"
                         + ("" if imp["allowed"] else "  NOT ALLOWED"))
    for finding in doc["findings"]:
        lines.append(f"{finding['severity']}: {finding['code']}: {finding['message']}")
    lines.append("ok" if doc["ok"] else "NOT OK")
    click.echo("\n".join(lines))
