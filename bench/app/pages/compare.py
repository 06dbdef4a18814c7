"""Compare: two or more submissions per site, case by case, with paired tests and the site generalization gap."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from bench.app import queries, ui
from bench.metrics import METRICS
from bench.report import PAIR_TWIN, metric_header

ctx = ui.context()
scope = ui.scope_sidebar(ctx)
dataset_version, protocol, convention = scope
runs = ui.run_choice()

st.title("Compare submissions")
left, right = st.columns([2, 3], vertical_alignment="top")
with left:
    metric = ui.metric_picker("Metric", key="compare_metric")
frame = ui.case_frame(ctx.url, ctx.version, scope, (metric,), runs)
board = ui.leaderboard(ctx.url, ctx.version, scope, (metric,), runs, None)
ranked = board["submission"].astype(str).tolist()  # best first
with right:
    chosen = st.multiselect(
        "Submissions (two or more)", ranked, default=ranked[: min(3, len(ranked))], key="compare_submissions", help="Listed by rank on the metric."
    )
if len(chosen) < 2:
    st.info("Pick at least two submissions to compare." if len(ranked) > 1 else "Only one submission has results in this scope.", icon=":material/info:")
    st.stop()

higher = METRICS[metric].higher_is_better
label = metric_header(metric)
colours = ui.colour_map(ranked)
subset = frame[frame["submission"].astype(str).isin(chosen)]
scores = queries.scored_values(subset, metric)
order = [s for s in ranked if s in chosen]

# -- per-site distributions ---------------------------------------------------------------------------------------
st.subheader("Per site")
style = st.segmented_control("Plot", ["Box", "Strip"], default="Box", key="compare_plot", required=True)
fig = go.Figure()
for submission in order:
    part = scores[scores["submission"] == submission]
    common = dict(x=part["site"], y=part["value"], name=submission, marker_color=colours[submission], customdata=np.stack([part["case_id"], part["state"]], axis=1))
    hover = "%{customdata[0]} (%{customdata[1]}): %{y:.3f}<extra>" + submission + "</extra>"
    if style == "Box":
        fig.add_trace(go.Box(**common, boxpoints="all", jitter=0.4, pointpos=0, boxmean=True, hovertemplate=hover))
    else:
        fig.add_trace(go.Box(**common, boxpoints="all", jitter=0.6, pointpos=0, fillcolor="rgba(0,0,0,0)", line_color="rgba(0,0,0,0)", hovertemplate=hover))
ui.plotly_layout(fig, height=420, boxmode="group")
fig.update_yaxes(title=label + (" (higher is better)" if higher else " (lower is better)"))
st.plotly_chart(fig, key="compare_sites")
st.caption("Every point is a case; failed or missing cases are drawn at the metric's worst value, infinite distances at the cap (hover for the state). The dashed line in a box is the mean.")

# -- paired scatter ---------------------------------------------------------------------------------------------------
st.subheader("Case by case")
pair_left, pair_right = st.columns(2)
first = pair_left.selectbox("x axis", order, index=0, key="compare_first")
second = pair_right.selectbox("y axis", [s for s in order if s != first], index=0, key="compare_second")
paired = queries.paired_values(subset, metric, first, second)
scatter = go.Figure()
for site, part in paired.groupby("site", sort=True):
    scatter.add_trace(
        go.Scatter(
            x=part["first"], y=part["second"], mode="markers", name=str(site), text=part["case_id"], marker=dict(size=10, opacity=0.85),
            hovertemplate="%{text}<br>" + first + ": %{x:.3f}<br>" + second + ": %{y:.3f}<extra>%{fullData.name}</extra>",
        )
    )
values = paired[["first", "second"]].to_numpy(dtype=float)
if np.isfinite(values).any():
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    scatter.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", line=dict(color="#999", dash="dash"), name="equal", hoverinfo="skip"))
ui.plotly_layout(scatter, height=460)
scatter.update_xaxes(title=f"{first} — {label}")
scatter.update_yaxes(title=f"{second} — {label}", scaleanchor="x", scaleratio=1)
st.plotly_chart(scatter, key="compare_scatter")
above = "better for " + (second if higher else first)
st.caption(f"One point per case, coloured by site. Points above the diagonal are {above}.")

# -- significance --------------------------------------------------------------------------------------------------------
st.subheader("Paired tests")
tests = queries.significance(subset, metric)
twins = {frozenset(pair) for pair in queries.twin_pairs(ui.get_store(ctx.url), subset)}
tests.insert(2, "relation", [PAIR_TWIN if frozenset((a, b)) in twins else "" for a, b in zip(tests["submission_a"], tests["submission_b"])])
st.dataframe(
    tests,
    hide_index=True,
    width="stretch",
    key="compare_tests",
    column_config={
        "submission_a": "A",
        "submission_b": "B",
        "relation": st.column_config.TextColumn("Relation", help="A pre-trained twin and its from-scratch submission: the test measures the pre-training alone."),
        "n": st.column_config.NumberColumn("Cases"),
        "mean_diff": st.column_config.NumberColumn("Mean A − B", format="%.3f"),
        "median_diff": st.column_config.NumberColumn("Median A − B", format="%.3f"),
        "statistic": st.column_config.NumberColumn("W", format="%.1f"),
        "p_value": st.column_config.NumberColumn("p", format="%.4f"),
        "p_holm": st.column_config.NumberColumn("p (Holm)", format="%.4f"),
        "significant": st.column_config.CheckboxColumn("Significant"),
        "better": "Better",
    },
)
st.caption("Two-sided Wilcoxon signed-rank tests on paired cases, Holm-corrected for the number of pairs (α = 0.05).")

# -- generalization gap ---------------------------------------------------------------------------------------------------
st.subheader("Generalization to unseen sites")
both = ui.case_frame(ctx.url, ctx.version, (dataset_version, None, convention), (metric,), runs)
gap = queries.generalization(both[both["submission"].astype(str).isin(chosen)], metric, n_boot=ui.N_BOOT)
if gap.empty:
    st.info(
        "The gap needs runs under both protocols: k-fold (every site seen in training) and leave-one-site-out. "
        "Run the missing protocol with `bench run ... --protocol kfold|loso`.",
        icon=":material/info:",
    )
else:
    bars = go.Figure()
    for submission in order:
        part = gap[gap["submission"] == submission]
        if part.empty:
            continue
        bars.add_trace(
            go.Bar(
                x=part["site"], y=part["gap"], name=submission, marker_color=colours[submission],
                error_y=dict(type="data", symmetric=False, array=part["gap_hi"] - part["gap"], arrayminus=part["gap"] - part["gap_lo"]),
                customdata=np.stack([part["internal_mean"], part["external_mean"]], axis=1),
                hovertemplate="%{x}: gap %{y:.3f}<br>k-fold %{customdata[0]:.3f}, LOSO %{customdata[1]:.3f}<extra>" + submission + "</extra>",
            )
        )
    ui.plotly_layout(bars, height=400, barmode="group")
    bars.update_yaxes(title=f"gap in {metric} (> 0: worse on an unseen site)", zeroline=True, zerolinecolor="#888")
    st.plotly_chart(bars, key="compare_gap")
    st.caption("Per case: k-fold score minus leave-one-site-out score, turned so that a positive gap means worse on a site the model never saw; mean with 95% bootstrap CI.")
    with st.expander("Gap table"):
        st.dataframe(gap, hide_index=True, width="stretch", key="compare_gap_table")
