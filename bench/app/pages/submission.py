"""Submission card: what a submission is (its manifest and README) and every run it has in the database.

Reached from the leaderboard's "open card" links: ``/submission?id=<content hash>``.
"""

from __future__ import annotations

import streamlit as st

from bench.app import queries, ui

ctx = ui.context()
with st.sidebar:
    ui.database_caption(ctx)

subs = ctx.store.table_frame("submissions").sort_values(["name", "version"])
labels = {row.content_hash: f"{row.name} {row.version} · {row.content_hash[:10]}" for row in subs.itertuples()}
wanted = st.query_params.get("id")
if wanted and wanted not in labels:
    matches = [h for h, label in labels.items() if h.startswith(wanted) or label.startswith(wanted)]  # a hash prefix or a name
    wanted = matches[0] if matches else None
options = list(labels)
content_hash = st.selectbox("Submission", options, index=options.index(wanted) if wanted in options else 0, format_func=labels.__getitem__, key="card_submission")
st.query_params["id"] = content_hash
card = queries.submission_card(ctx.store, content_hash)
if card is None:
    st.error(f"No submission {content_hash!r} in this database.")
    st.stop()

manifest = card.manifest
st.title(f"{card.name} {card.version}")
st.caption(f"kind `{card.kind}` · content hash `{card.content_hash}`")
if manifest.get("description"):
    st.markdown(manifest["description"])
facts = st.columns(3)
facts[0].markdown("**Authors**  \n" + ", ".join(manifest.get("authors") or ["–"]))
facts[1].markdown(f"**Licence**  \n{manifest.get('licence') or manifest.get('license') or '–'}")
inputs = manifest.get("inputs") or {}
facts[2].markdown(f"**Inputs**  \n{', '.join(inputs.get('channels') or [])} · {inputs.get('space', 'native')} space")

st.subheader("Runs")
runs = card.runs
if runs is None or runs.empty:
    st.caption("No run of this submission yet.")
else:
    def pretrained(budget) -> str:
        """The checkpoints the run's folds started from (bench.models.transfer), from its stored budget."""
        folds = (budget.get("folds") or {}).values() if isinstance(budget, dict) else ()
        found = {f"{t['sha256'][:12]} ({t['share']:.0%} loaded)" for t in ((f or {}).get("transfer") for f in folds) if t}
        return ", ".join(sorted(found)) or "–"

    runs = runs.assign(budget_used=runs["budget"].map(lambda b: b.get("summary", "") if isinstance(b, dict) else "does not train"),
                       pretrained=runs["budget"].map(pretrained))
    st.dataframe(
        runs[[c for c in ("run_id", "dataset", "protocol", "convention", "lesion_rule", "run_status", "n_cases", "n_failed", "isolation",
                          "budget_used", "pretrained", "started_at", "finished_at", "device", "code_version") if c in runs]],
        hide_index=True,
        width="stretch",
        key="card_runs",
        column_config={
            "run_id": "run",
            "run_status": "status",
            "n_cases": st.column_config.NumberColumn("cases"),
            "n_failed": st.column_config.NumberColumn("failed"),
            "started_at": st.column_config.DatetimeColumn("started", format="YYYY-MM-DD HH:mm"),
            "finished_at": st.column_config.DatetimeColumn("finished", format="YYYY-MM-DD HH:mm"),
            "code_version": "code version",
            "lesion_rule": "lesions matched",
            "isolation": "predictions isolated by",
            "budget_used": "training budget used",
            "pretrained": "pre-trained weights",
        },
    )

if card.readme:
    st.subheader("README")
    with st.container(border=True):
        st.markdown(card.readme)
with st.expander("submission.yaml (as stored)"):
    st.json(manifest, expanded=True)
if card.path:
    st.caption(f"Folder: `{card.path}`")
