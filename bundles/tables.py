"""The paper's tables as study rows: what each row trains, and the parameter counts the paper prints for it.

``medtuning-study --table N`` runs the rows of table N (each row in its own process, as the method study does)
and writes ``study.csv``/``study.md`` in the table's layout. Counts are given at the paper's size (BraTS setting:
4 input channels, 4 classes, 128 x 128 x 128 patches), whatever network the rows train, so they can be compared
with the paper's printed figures (in millions, three decimals) on any data and budget.

Where the paper's reference code counts parameters that the network here does not build, the row says how many
(``paper_extra``) and why; the check is then ``counted + paper_extra`` against the paper's figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Row", "Table", "TABLES", "table_names", "get_table", "paper_size_counts", "pretrained_sweep", "PAPER_SIZE"]

PAPER_SIZE = {"in_channels": 4, "num_classes": 4, "img_size": 128}  # the setting of the paper's printed counts
SWIN_ALPHA4 = {"reduction": 4}  # Tables 10-12 use alpha = 4 on Swin-UNet: their FFT row is the alpha = 4 model


@dataclass(frozen=True)
class Row:
    label: str
    method: str = "med_adapter"
    method_options: dict = field(default_factory=dict)
    network_options: dict = field(default_factory=dict)
    train_fraction: float | None = None  # None: the study's --train_fraction
    paper: dict = field(default_factory=dict)  # backbone -> {"tuned": M, "inserted": M} as the paper prints them
    paper_extra: int = 0  # parameters the paper's reference counts that this network does not build
    notes: dict = field(default_factory=dict)  # backbone -> a footnote on the paper's figure
    weights: str = ""  # a pretrained-weights sweep's name for the row's file (Table 5's columns)
    pretrained: str | None = None  # the row's own pretrained file (None: the study's --pretrained)


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    column: str  # the header of the rows' label column, as in the paper
    rows: tuple[Row, ...]
    backbone: str = "vit_b16_upernet"  # the backbone the paper's table uses (the default of --backbone)
    backbones: tuple[str, ...] = ("vit_b16_upernet", "swin_unet")  # where the rows' options exist


def _methods() -> tuple[Row, ...]:
    # Tables 1-3: tuned / inserted parameters (M) of each method, ViT-B/16 + UPerNet and Swin-UNet
    printed = {
        "full": ((100.849, None), (27.154, None)), "head": ((15.007, None), (6.752, None)),
        "vpt_shallow": ((15.015, 0.008), (6.753, 0.001)), "vpt_deep": ((15.1, 0.092), (6.78, 0.029)),
        "adapter": ((18.567, 3.56), (7.541, 0.79)), "adaptformer": ((16.197, 1.19), (7.124, 0.372)),
        "pro_tuning": ((19.812, 4.805), (8.359, 1.607)), "st_adapter": ((22.118, 7.11), (8.328, 1.577)),
        "med_adapter": ((17.853, 2.846), (7.489, 0.738)),
    }
    rows = []
    for method, (vit, swin) in printed.items():
        paper = {"vit_b16_upernet": {"tuned": vit[0], "inserted": vit[1]},
                 "swin_unet": {"tuned": swin[0], "inserted": swin[1]}}
        notes = {"swin_unet": "the paper adds VPT-Shallow's 0.001 M to the rounded head (6.752)"} \
            if method == "vpt_shallow" else {}
        rows.append(Row(method, method, paper=paper, notes=notes))
    return tuple(rows)


def _reduction() -> tuple[Row, ...]:
    printed = {2: (10.064, 3.313), 4: (7.994, 1.243), 6: (7.489, 0.738), 8: (7.271, 0.52)}
    return tuple(Row(f"alpha = {a}", method_options={"reduction": a},
                     paper={"swin_unet": {"tuned": t, "inserted": i}}) for a, (t, i) in printed.items())


# the reference's ViT builds the 1x1 conv + BN reducing block 2 to 256 channels whatever the decoder; SETR's
# decoders do not read it, so it is not built here, and the paper's SETR counts include it
VIT_BLOCK2_REDUCTION = 768 * 256 + 256 + 2 * 256

TABLES: dict[str, Table] = {t.key: t for t in (
    Table("methods", "Tables 1-3: tuning methods", "method", _methods()),
    Table("reduction", "Reduction ratio alpha of the Med-Adapter", "reduction ratio", _reduction(),
          backbone="swin_unet"),
    Table("4", "Table 4: the stages that get Med-Adapters", "stages with adapters", (
        Row("stage 4", method_options={"stages": [3]}),
        Row("stages 3-4", method_options={"stages": [2, 3]}),
        Row("stages 2-4", method_options={"stages": [1, 2, 3]}),
        Row("stages 1-4 (Med-Tuning)"),
    ), backbone="swin_unet"),
    Table("10", "Table 10: the global branch of Intra-FE", "global branch", (
        Row("FFT (Med-Tuning)", method_options=dict(SWIN_ALPHA4),
            paper={"swin_unet": {"tuned": 7.994, "inserted": 1.243}}),
        Row("DWConv9", method_options=dict(SWIN_ALPHA4, global_branch="dwconv9")),
        Row("DWConv11", method_options=dict(SWIN_ALPHA4, global_branch="dwconv11")),
    ), backbone="swin_unet"),
    Table("11", "Table 11: the parts of Intra-FE", "Intra-FE parts", (
        Row("vanilla adapter", method_options=dict(SWIN_ALPHA4, kernel_sizes=[], global_branch="none",
                                                   channel_mixing=False, inter_stage="off")),
        Row("+ MLB", method_options=dict(SWIN_ALPHA4, global_branch="none", channel_mixing=False,
                                         inter_stage="off")),
        Row("+ FGB", method_options=dict(SWIN_ALPHA4, kernel_sizes=[], channel_mixing=False, inter_stage="off")),
        Row("+ MLB + FGB", method_options=dict(SWIN_ALPHA4, channel_mixing=False, inter_stage="off")),
        Row("+ MLB + FGB + channel mixing (Intra-FE)", method_options=dict(SWIN_ALPHA4, inter_stage="off")),
    ), backbone="swin_unet"),
    Table("12", "Table 12: how Inter-FI joins the previous stage", "Inter-FI", (
        Row("off", method_options=dict(SWIN_ALPHA4, inter_stage="off")),
        Row("concatenation (Med-Tuning)", method_options=dict(SWIN_ALPHA4),
            paper={"swin_unet": {"tuned": 7.994, "inserted": 1.243}}, notes={"swin_unet": "+0.319 M over off"}),
        Row("addition", method_options=dict(SWIN_ALPHA4, inter_stage="add")),
        Row("maximum", method_options=dict(SWIN_ALPHA4, inter_stage="max")),
    ), backbone="swin_unet"),
    Table("13", "Table 13: decoders for ViT-B/16", "decoder", (
        Row("UPerNet (Med-Tuning)", method_options={"reduction": 4}),
        Row("SETR-Naive", method_options={"reduction": 4}, network_options={"decoder": "setr_naive"},
            paper={"vit_b16_upernet": {"tuned": 5.004, "inserted": None}}, paper_extra=VIT_BLOCK2_REDUCTION,
            notes={"vit_b16_upernet": "the paper also counts the reference ViT's block-2 reduction (0.197 M), "
                                      "which SETR-Naive does not read"}),
        Row("SETR-PUP", method_options={"reduction": 4}, network_options={"decoder": "setr_pup"}),
        Row("SETR-MLA", method_options={"reduction": 4}, network_options={"decoder": "setr_mla"}),
    ), backbones=("vit_b16_upernet",)),
    Table("14", "Table 14: data efficiency", "training data", tuple(
        Row(f"{round(f * 100)} %", train_fraction=f) for f in (0.05, 0.25, 0.5, 1.0))),
)}


def pretrained_sweep(methods: list[str], files: dict[str, str]) -> Table:
    """Table 5's layout: every method with every pretrained file. Each row's network takes the family and sizes
    its file sets (read once here, so the paper-size counts are those of the network each file builds)."""
    from ..networks.models import options_from_file

    rows = []
    for name, path in files.items():
        options = options_from_file(path, {})[1]
        for method in methods:
            rows.append(Row(f"{method} · {name}", method, network_options=options, weights=name,
                            pretrained=str(path)))
    return Table("pretrained", "Table 5: pretrained weights", "method", tuple(rows), backbones=("vit_b16_upernet",))


def table_names() -> list[str]:
    return list(TABLES)


def get_table(name: str, backbone: str | None = None) -> tuple[Table, str]:
    """The table and the backbone its rows run on (``backbone`` or the paper's); a clear error otherwise."""
    try:
        table = TABLES[str(name)]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}") from None
    backbone = backbone or table.backbone
    if backbone not in table.backbones:
        raise ValueError(f"table {table.key} ({table.title}) runs on {', '.join(table.backbones)}, not {backbone}")
    return table, backbone


def paper_size_counts(row: Row, backbone: str) -> dict:
    """Tuned and inserted parameters of the row's network at the paper's size (built on the meta device)."""
    from ..networks.tools.summary import build_for_summary, parameter_summary

    network = build_for_summary(backbone, row.method, method_options=dict(row.method_options) or None,
                                **PAPER_SIZE, **row.network_options)
    summary = parameter_summary(network)
    return {"tuned": summary["tuned"], "inserted": summary["inserted"]}
