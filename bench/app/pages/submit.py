"""Submit: upload a submission (or a zip of predictions), verify it, queue its benchmark run, follow the queue.

The page unpacks and checks the upload but runs no model: the run is a job in the store's queue, taken
by ``bench worker`` (bench/worker.py), which runs the harness in its own process.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from bench.app import queries, ui, uploads
from bench.submissions.kinds import KIND_LOADERS

ctx = ui.context(require_results=False)
with st.sidebar:
    ui.database_caption(ctx)

LIMITS = uploads.UploadLimits()
STATUS_ICONS = {"queued": "🕓 queued", "running": "⚙️ running", "done": "✅ done", "failed": "❌ failed"}

st.title("Submit a model")
st.markdown(
    f"""
Upload **a zip of your submission folder** (with its `submission.yaml`; any kind: `python`, `onnx`, `torchscript`,
`monai-bundle`, `nnunet`, `predictions`, `trainable`; see `docs/submissions.md`) or **a zip of predicted masks**,
one `<case_id>.nii.gz` per case. The archive is unpacked safely (no absolute paths, `..` or links; at most
{LIMITS.max_upload_bytes // 2**20} MB uploaded, {LIMITS.max_unpacked_bytes // 2**30} GB unpacked) and checked; the benchmark
run is then queued for **`bench worker`**, which must be running beside the app.
"""
)

# -- 1. upload ---------------------------------------------------------------------------------------------------------
st.subheader("1 · Upload")
upload = st.file_uploader("Submission or predictions (.zip)", type=["zip"], key="upload", max_upload_size=LIMITS.max_upload_bytes // 2**20)
data = upload.getvalue() if upload is not None else None
needs_card = data is not None and not uploads.has_manifest(data)
card = None
if needs_card:
    st.caption("No `submission.yaml` in this zip: it is taken as predicted masks. Describe the model they come from.")
    first, second = st.columns(2)
    name = first.text_input("Name", key="card_name", placeholder="my-unet", help="Lower-case letters, digits, '.', '_' and '-'.")
    version = second.text_input("Version", "1.0.0", key="card_version")
    authors = first.text_input("Authors (comma separated)", key="card_authors")
    licence = second.text_input("Licence", "CC-BY-4.0", key="card_licence")
    description = st.text_area("Description", key="card_description", placeholder="Architecture, training data, training schedule.")
    if name:
        card = uploads.PredictionsCard(
            name=name.strip(),
            version=version.strip() or "1.0.0",
            authors=tuple(a.strip() for a in authors.split(",") if a.strip()) or ("anonymous",),
            description=description.strip() or "Precomputed lesion masks uploaded in the HIE-Bench app.",
            licence=licence.strip() or "CC-BY-4.0",
        )

# -- 2. benchmark settings -------------------------------------------------------------------------------------------
st.subheader("2 · Benchmark")
choices = uploads.available_datasets(ctx.store, ctx.source.data_root)
if not choices:
    st.warning(f"No dataset found (none registered in the database, none under `{ctx.source.data_root}`). Create one with `make demo` or `bench data synth`.")
columns = st.columns([3, 2, 1])
default = uploads.default_dataset(choices, ctx.store, st.session_state.get("scope_dataset"))
dataset_label = columns[0].selectbox("Dataset", list(choices), index=default, key="submit_dataset",
                                     help="Default: the dataset in the sidebar's scope, else the first one with results.")
protocol = columns[1].radio("Protocol", list(queries.PROTOCOL_LABELS), format_func=queries.PROTOCOL_LABELS.__getitem__, key="submit_protocol", horizontal=True)
folds = columns[2].number_input("Folds", min_value=2, max_value=10, value=5, key="submit_folds", disabled=protocol != "kfold")
replace = st.checkbox(uploads.REPLACE_LABEL, key="submit_replace")

# -- 3. check --------------------------------------------------------------------------------------------------------------
st.subheader("3 · Check")
if st.button("Check the upload", type="primary", disabled=data is None or (needs_card and card is None), key="check_upload"):
    with st.spinner("Unpacking and verifying…"):
        result = uploads.install_upload(
            data, upload.name, ctx.source.uploads_dir, predictions=card, dataset_root=choices.get(dataset_label), limits=LIMITS, replace=replace
        )
    st.session_state["upload_result"] = result
    st.session_state.pop("queued_job", None)
result: uploads.UploadResult | None = st.session_state.get("upload_result")
if result is not None:
    errors = [p for p in result.problems if p.severity == "error"]
    warnings = [p for p in result.problems if p.severity != "error"]
    if result.ok:
        st.success(f"**{result.name}** (kind `{result.kind}`) is unpacked in `{result.path}` and passes the checks the app can run.", icon=":material/check_circle:")
        loader = KIND_LOADERS.get(result.kind)
        if loader is not None and loader.runs_code and not loader.trains:  # a model the worker probes before it scores
            st.caption("The model itself runs for the first time in the worker: its probe run (shape, labels, determinism, time limit) is the job's first step.")
    else:
        st.error(f"The upload was refused: {len(errors)} problem(s) to fix.", icon=":material/error:")
    if result.problems:
        st.dataframe(
            pd.DataFrame([{"": "error" if p.severity == "error" else "warning", "where": p.where, "problem": p.message, "how to fix": p.fix} for p in errors + warnings]),
            hide_index=True,
            width="stretch",
            key="upload_problems",
        )

# -- 4. queue -------------------------------------------------------------------------------------------------------------
st.subheader("4 · Queue the run")
ready = result is not None and result.ok and dataset_label in choices
if st.button("Queue benchmark run", disabled=not ready or "queued_job" in st.session_state, key="queue_run"):
    spec = uploads.run_spec(
        result.path, choices[dataset_label], db_url=ctx.source.db_url, results_dir=ctx.source.results_dir, protocol=protocol, folds=int(folds)
    )
    st.session_state["queued_job"] = uploads.queue_run(ctx.store, spec)
if "queued_job" in st.session_state:
    st.success(
        f"Job #{st.session_state['queued_job']} is queued. It runs when `bench worker` takes it; its status and log appear below.",
        icon=":material/schedule:",
    )
elif not ready:
    st.caption("Upload and check a submission first.")

# -- the queue -------------------------------------------------------------------------------------------------------------
st.subheader("Queue")
st.caption(
    "Start a worker beside the app (same database): "
    f"`HIE_BENCH_DB_URL={ctx.source.display_url} bench worker` — it takes the jobs one at a time."
)


def _age(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = (datetime.now(timezone.utc) - moment).total_seconds()
    return f"{seconds:.0f} s ago" if seconds < 90 else f"{seconds / 60:.0f} min ago" if seconds < 5400 else moment.strftime("%Y-%m-%d %H:%M UTC")


@st.fragment(run_every=3)
def job_list() -> None:
    """The most recent jobs, refreshed every few seconds (only this fragment reruns)."""
    jobs = uploads.jobs_table(ctx.store, limit=20)
    if not jobs:
        st.caption("No job yet.")
        return
    rows = []
    for job in jobs:
        spec = job.spec or {}
        rows.append(
            {
                "job": job.id,
                "status": STATUS_ICONS.get(job.status, job.status),
                "submission": str(spec.get("submission", "")).rstrip("/").rsplit("/", 1)[-1],
                "dataset": str(spec.get("dataset", "")).rstrip("/").rsplit("/", 1)[-1],
                "protocol": spec.get("protocol", ""),
                "queued": _age(job.created_at),
                "finished": _age(job.finished_at),
                "worker": job.worker or "",
                "run": job.run_id or "",
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="job_table")
    if any(job.status == "queued" for job in jobs) and not any(job.status == "running" for job in jobs):
        st.info("Jobs are waiting: is `bench worker` running?", icon=":material/hourglass_top:")
    for job in jobs[:5]:
        with st.expander(f"Job #{job.id} · {job.status}" + (f" · run {job.run_id}" if job.run_id else ""), expanded=job.status in ("running", "failed") and job is jobs[0]):
            if job.error:
                st.error(job.error)
            st.code(job.log_tail[-4000:] or "(no output yet)", language="text")


job_list()
