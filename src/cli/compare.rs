//! `coopc compare DIR…`: plots several runs' `metrics.jsonl` side by side and
//! summarises them in a markdown table.
//!
//! Runs are grouped by method, and further by any `--group-by` field of their
//! `spec.json` (for instance `bilevel.hypergradient` or `bilevel.lambda`).
//! Each group is one line, the mean over its runs (seeds), with a shaded band
//! over the same runs (min–max, or ± one sample standard deviation; the
//! legend says which). Runs are aligned by meta-step: a group's point at step
//! s is drawn where every run of the group has a value at s, at the mean of
//! the runs' x values there (their wall time or FLOP count when the x axis is
//! time or FLOPs). Per-step series (rollout reward, SFT loss) are smoothed per
//! run before the mean with TensorBoard's debiased exponential moving
//! average; held-out evaluations are drawn as measured, with markers.
//!
//! The figure is a 2×2 grid — held-out eval accuracy against the chosen x
//! axis and against the other of meta-step / wall time, rollout reward mean
//! and SFT loss against the chosen x axis — with the legend on the right.
//! y ranges are fitted to what is drawn unless `--ylim` fixes them, and every
//! line, band and marker is clipped to its panel. Text is rendered with the
//! bundled DejaVu Sans (`assets/fonts/`), so the output does not depend on
//! the fonts installed on the machine.
//!
//! The table has one row per run and, when some group has several runs, one
//! row per group with mean ± sample standard deviation and the number of runs.
//! `--last K` reads a run's accuracy as the mean of its last K evaluations
//! (checkpoint-to-checkpoint noise is large). `--baseline GROUP` adds a table
//! of paired differences, baseline − group, over the runs that share a
//! `train.seed` (from each run's `spec.json`): at equal steps, at equal wall
//! time and at equal FLOPs (each pair read at the shorter run's end: a run's
//! accuracy at x is its last evaluation at or before x), each with the mean
//! over seeds and a percentile-bootstrap 95 % interval of that mean;
//! `--threshold A` adds the wall time and FLOPs at which each group first
//! evaluates at ≥ A.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use coopc_train::Metrics;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Size of the written PNG, in pixels.
pub const PNG_SIZE: (u32, u32) = (1400, 900);

const FONT: &str = "sans-serif";
const DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const LEGEND_WIDTH: u32 = 310;
const TITLE_HEIGHT: u32 = 44;
/// Opacity of a group's band.
const BAND_ALPHA: f64 = 0.2;

/// Tableau 10: distinguishable, and readable on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

// ---------------------------------------------------------------- options

/// What the x axis of the main panels measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XAxis {
    /// Meta-steps.
    Step,
    /// Wall-clock seconds since the run started.
    Time,
    /// The compiled programs' arithmetic (`flops` in metrics.jsonl).
    Flops,
}

impl XAxis {
    fn of(self, r: &Row) -> Option<f64> {
        match self {
            XAxis::Step => Some(r.step as f64),
            XAxis::Time => finite(Some(r.wall_time_s)),
            XAxis::Flops => finite(r.flops),
        }
    }
    fn desc(self) -> &'static str {
        match self {
            XAxis::Step => "meta-step",
            XAxis::Time => "wall time (s)",
            XAxis::Flops => "FLOPs (plan count)",
        }
    }
    fn name(self) -> &'static str {
        match self {
            XAxis::Step => "meta-step",
            XAxis::Time => "wall time",
            XAxis::Flops => "FLOPs",
        }
    }
}

/// The spread a group's band shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Band {
    /// From the smallest to the largest of the group's runs.
    Minmax,
    /// Mean ± one sample standard deviation over the group's runs.
    Std,
    /// No band.
    None,
}

/// Which quantity a panel plots (the names `--ylim` takes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    /// Held-out eval accuracy (`eval`).
    Eval,
    /// Rollout reward mean (`reward`).
    Reward,
    /// SFT loss (`sft`).
    Sft,
}

impl Quantity {
    fn of(self, r: &Row) -> Option<f64> {
        match self {
            Quantity::Eval => finite(r.eval_accuracy),
            Quantity::Reward => finite(r.reward_mean),
            Quantity::Sft => finite(Some(r.sft_loss)),
        }
    }
}

/// `--ylim QUANTITY=LO:HI`: a fixed y range for the panels of one quantity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YLimit {
    pub quantity: Quantity,
    pub lo: f64,
    pub hi: f64,
}

impl FromStr for YLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            "expected QUANTITY=LO:HI with QUANTITY one of eval, reward, sft (e.g. reward=-1:1)";
        let (name, range) = s.split_once('=').ok_or_else(|| format!("`{s}`: {usage}"))?;
        let quantity = match name.trim() {
            "eval" => Quantity::Eval,
            "reward" => Quantity::Reward,
            "sft" => Quantity::Sft,
            other => return Err(format!("`{other}` is not a panel quantity: {usage}")),
        };
        let (lo, hi) = range
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: {usage}"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("`{v}` in `{s}` is not a finite number"))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo >= hi {
            return Err(format!("`{s}`: the low end must be below the high end"));
        }
        Ok(YLimit { quantity, lo, hi })
    }
}

/// How `coopc compare` groups, smooths and lays out the runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fields of the runs' `spec.json` (dotted paths) that, beside the
    /// method, split runs into groups.
    pub group_by: Vec<String>,
    pub band: Band,
    /// TensorBoard's smoothing weight in [0, 1): 0 draws the values as
    /// they are.
    pub smooth: f64,
    pub x: XAxis,
    pub ylim: Vec<YLimit>,
    /// A run's accuracy is the mean of its last this-many evaluations.
    pub last: usize,
    /// Paired differences against this group.
    pub baseline: Option<String>,
    /// Report when each group first reaches this held-out accuracy.
    pub threshold: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            group_by: Vec::new(),
            band: Band::Minmax,
            smooth: 0.6,
            x: XAxis::Step,
            ylim: Vec::new(),
            last: 1,
            baseline: None,
            threshold: None,
        }
    }
}

impl Options {
    fn check(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.smooth) {
            return Err(format!(
                "--smooth must be in [0, 1) (0: no smoothing), got {}",
                self.smooth
            ));
        }
        if self.last == 0 {
            return Err("--last must be at least 1 (evaluations averaged)".to_string());
        }
        if let Some(t) = self.threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(format!("--threshold is an accuracy in [0, 1], got {t}"));
            }
        }
        Ok(())
    }
    fn ylim(&self, q: Quantity) -> Option<(f64, f64)> {
        self.ylim
            .iter()
            .rev()
            .find(|l| l.quantity == q)
            .map(|l| (l.lo, l.hi))
    }
}

// ---------------------------------------------------------------- runs

/// One metrics row, as the trainer writes it.
type Row = Metrics;

struct Run {
    folder: String,
    /// The group this run belongs to (method, then the --group-by values).
    group: String,
    rows: Vec<Row>,
    /// `train.seed` from the run's spec.json, when it has one.
    seed: Option<u64>,
}

impl Run {
    fn steps(&self) -> usize {
        self.rows.len()
    }
    /// The mean of the last `k` evaluations (fewer when the run has fewer).
    fn last_evals(&self, k: usize) -> Option<f64> {
        let tail: Vec<f64> = self
            .rows
            .iter()
            .rev()
            .filter_map(|r| finite(r.eval_accuracy))
            .take(k)
            .collect();
        (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64)
    }
    /// The last evaluation at or before `x` on `axis` (`None` before the
    /// first).
    fn eval_at(&self, axis: XAxis, x: f64) -> Option<f64> {
        self.rows
            .iter()
            .filter(|r| axis.of(r).is_some_and(|v| v <= x))
            .filter_map(|r| finite(r.eval_accuracy))
            .next_back()
    }
    /// Where on `axis` the run last has a value.
    fn end(&self, axis: XAxis) -> Option<f64> {
        self.rows.iter().rev().find_map(|r| axis.of(r))
    }
    /// Where on `axis` the run first evaluates at `threshold` or above.
    fn first_reaching(&self, axis: XAxis, threshold: f64) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| finite(r.eval_accuracy).is_some_and(|a| a >= threshold))
            .and_then(|r| axis.of(r))
    }
    fn best_eval(&self) -> Option<f64> {
        self.rows
            .iter()
            .filter_map(|r| finite(r.eval_accuracy))
            .fold(None, |best, v| Some(best.map_or(v, |b: f64| b.max(v))))
    }
    /// Mean rollout reward over the last tenth (at least one) of the steps
    /// that had rollouts: one step's reward is too noisy to rank runs by.
    fn late_reward(&self) -> Option<f64> {
        self.late(|r| r.reward_mean)
    }
    /// The policy's entropy on the rollouts, as [`Run::late_reward`].
    fn late_entropy(&self) -> Option<f64> {
        self.late(|r| r.entropy)
    }
    /// Mean of a per-step value over the last tenth (at least one) of the
    /// steps that have it.
    fn late(&self, get: fn(&Row) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.rows.iter().filter_map(|r| finite(get(r))).collect();
        if values.is_empty() {
            return None;
        }
        let n = values.len().div_ceil(10);
        let tail = &values[values.len() - n..];
        Some(tail.iter().sum::<f64>() / n as f64)
    }
    fn wall_time(&self) -> Option<f64> {
        self.rows
            .iter()
            .rev()
            .find_map(|r| finite(Some(r.wall_time_s)))
    }
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

/// One point of a group's line: the mean over the group's runs at one
/// meta-step, and the band's ends there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupPoint {
    pub step: usize,
    /// Mean of the runs' x values at this step.
    pub x: f64,
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
    /// Runs that have a value here.
    pub runs: usize,
}

/// A group's line in one panel.
#[derive(Clone, Debug)]
pub struct GroupLine {
    pub group: String,
    pub runs: usize,
    pub points: Vec<GroupPoint>,
}

/// One panel as drawn: its data and where it landed in the image.
#[derive(Clone, Debug)]
pub struct PanelView {
    pub title: String,
    /// Pixels of the panel's plotting area (inside the axes): x range and y range.
    pub plot_area: (std::ops::Range<i32>, std::ops::Range<i32>),
    /// Pixels of the panel's whole cell of the grid (axes and labels too).
    pub cell: (std::ops::Range<i32>, std::ops::Range<i32>),
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub lines: Vec<GroupLine>,
}

/// A rendered comparison: the RGB pixels, what each panel shows, the table.
pub struct Figure {
    pub width: u32,
    pub height: u32,
    /// Row-major RGB, 3 bytes per pixel.
    pub pixels: Vec<u8>,
    pub panels: Vec<PanelView>,
    pub table: String,
}

/// Reads the runs in `dirs`, writes the comparison figure to `png` and returns
/// the markdown summary (also written to `markdown` when given).
///
/// Each entry of `dirs` is a run folder holding `metrics.jsonl` (a path to
/// the `metrics.jsonl` itself is accepted too). Errors name the folder or
/// file, and the line for a malformed row.
pub fn compare(
    dirs: &[PathBuf],
    png: &Path,
    markdown: Option<&Path>,
    opts: &Options,
) -> Result<String, String> {
    let fig = render(dirs, PNG_SIZE, opts)?;
    write_png(png, &fig)?;
    if let Some(md) = markdown {
        ensure_parent(md)?;
        std::fs::write(md, &fig.table).map_err(|e| format!("{}: {e}", md.display()))?;
    }
    Ok(fig.table)
}

/// Reads the runs in `dirs` and draws the comparison into an image of
/// `size` pixels, without writing anything.
pub fn render(dirs: &[PathBuf], size: (u32, u32), opts: &Options) -> Result<Figure, String> {
    opts.check()?;
    if dirs.is_empty() {
        return Err("compare needs at least one run folder".to_string());
    }
    let runs = dirs
        .iter()
        .map(|d| load_run(d, &opts.group_by))
        .collect::<Result<Vec<_>, _>>()?;
    if opts.x == XAxis::Flops {
        let without: Vec<&str> = runs
            .iter()
            .filter(|r| r.rows.iter().all(|row| finite(row.flops).is_none()))
            .map(|r| r.folder.as_str())
            .collect();
        if !without.is_empty() {
            return Err(format!(
                "--x flops: {} record no FLOP count in metrics.jsonl (runs written before coopc counted FLOPs); use --x step or --x time",
                without.join(", ")
            ));
        }
    }
    let mut table = markdown_table(&runs, opts.last);
    if let Some(base) = &opts.baseline {
        table.push_str(&paired_table(&runs, base, opts)?);
    }
    let (w, h) = size;
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    register_font()?;
    let panels = {
        let backend = GlyphText::new(BitMapBackend::with_buffer(&mut pixels, (w, h)))?;
        let root = backend.into_drawing_area();
        let panels = draw_figure(&root, &runs, opts).map_err(|e| format!("drawing failed: {e}"))?;
        root.present().map_err(|e| format!("drawing failed: {e}"))?;
        panels
    };
    Ok(Figure {
        width: w,
        height: h,
        pixels,
        panels,
        table,
    })
}

fn write_png(png_path: &Path, fig: &Figure) -> Result<(), String> {
    ensure_parent(png_path)?;
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, fig.width, fig.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| format!("{}: {e}", png_path.display()))?;
        writer
            .write_image_data(&fig.pixels)
            .map_err(|e| format!("{}: {e}", png_path.display()))?;
    }
    std::fs::write(png_path, bytes).map_err(|e| format!("{}: {e}", png_path.display()))
}

fn load_run(dir: &Path, group_by: &[String]) -> Result<Run, String> {
    let (folder_path, file) = if dir.is_file() {
        (
            dir.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            dir.to_path_buf(),
        )
    } else if dir.is_dir() {
        (dir.to_path_buf(), dir.join("metrics.jsonl"))
    } else {
        return Err(format!("{}: no such run folder", dir.display()));
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{}: no metrics.jsonl in this folder (not a run folder, or the run has not finished a step)",
                folder_path.display()
            ))
        }
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    let mut rows: Vec<Row> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(line)
            .map_err(|e| format!("{} line {}: {e}", file.display(), i + 1))?;
        // A resumed run may repeat steps: the later rows replace the earlier ones.
        let keep = rows.partition_point(|r| r.step < row.step);
        rows.truncate(keep);
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(format!("{}: no metrics rows", file.display()));
    }
    let mut group = rows[0].method.clone();
    // spec.json gives the seed when it is there; --group-by needs it.
    let spec = read_spec_json(&folder_path);
    if !group_by.is_empty() {
        let spec = spec.as_ref().map_err(Clone::clone)?;
        for field in group_by {
            let v = spec_field(spec, field).ok_or_else(|| {
                let top: Vec<String> = spec
                    .as_object()
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default();
                format!(
                    "{}: --group-by {field}: no such field in spec.json (dotted path from one of: {})",
                    folder_path.join("spec.json").display(),
                    top.join(", ")
                )
            })?;
            // The field's last segment names it in the label, so legends stay short.
            let key = field.rsplit('.').next().unwrap_or(field);
            let _ = write!(group, ", {key}={}", value_label(v));
        }
    }
    let seed = spec
        .ok()
        .and_then(|spec| spec_field(&spec, "train.seed").and_then(|v| v.as_u64()));
    Ok(Run {
        folder: folder_name(&folder_path),
        group,
        rows,
        seed,
    })
}

fn read_spec_json(dir: &Path) -> Result<serde_json::Value, String> {
    let path = dir.join("spec.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (--group-by reads the run's spec.json)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The value at a dotted path (`bilevel.hypergradient.kind`).
fn spec_field<'a>(spec: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.')
        .try_fold(spec, |v, key| v.as_object()?.get(key))
}

/// A field's value as a short label: strings bare, anything else compact JSON.
fn value_label(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn folder_name(dir: &Path) -> String {
    let named = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n != "..")
    };
    named(dir)
        .or_else(|| dir.canonicalize().ok().as_deref().and_then(named))
        .unwrap_or_else(|| dir.display().to_string())
}

fn ensure_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))
        }
        _ => Ok(()),
    }
}

/// The groups in the order their first run was given.
fn groups_in_order(runs: &[Run]) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for r in runs {
        if !groups.contains(&r.group) {
            groups.push(r.group.clone());
        }
    }
    groups
}

// ---------------------------------------------------------------- series

/// TensorBoard's debiased exponential moving average with weight `w`: the
/// first value is kept as it is, later ones lean on their history.
pub fn smooth_ema(values: &[f64], w: f64) -> Vec<f64> {
    if w <= 0.0 {
        return values.to_vec();
    }
    let mut last = 0.0;
    let mut debias = 1.0;
    values
        .iter()
        .map(|&v| {
            last = last * w + (1.0 - w) * v;
            debias *= w;
            last / (1.0 - debias)
        })
        .collect()
}

/// The group's line for quantity `q` against x axis `x`: each run's finite
/// values (smoothed when `smooth` > 0), aligned by meta-step.
fn group_line(runs: &[&Run], q: Quantity, x: XAxis, smooth: f64, band: Band) -> Vec<GroupPoint> {
    // step → (x values, y values) over the runs that have both there.
    let mut at: BTreeMap<usize, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for run in runs {
        let pts: Vec<(usize, f64, f64)> = run
            .rows
            .iter()
            .filter_map(|r| Some((r.step, x.of(r)?, q.of(r)?)))
            .collect();
        let ys: Vec<f64> = pts.iter().map(|p| p.2).collect();
        let ys = smooth_ema(&ys, smooth);
        for (&(step, xv, _), y) in pts.iter().zip(ys) {
            let e = at.entry(step).or_default();
            e.0.push(xv);
            e.1.push(y);
        }
    }
    // Where every run has a value; where no step has all of them (runs
    // evaluated on different schedules), wherever any has.
    let full = at.values().any(|(_, ys)| ys.len() == runs.len());
    at.into_iter()
        .filter(|(_, (_, ys))| !full || ys.len() == runs.len())
        .map(|(step, (xs, ys))| {
            let n = ys.len() as f64;
            let mean = ys.iter().sum::<f64>() / n;
            let (lo, hi) = match band {
                Band::Minmax => (
                    ys.iter().copied().fold(f64::INFINITY, f64::min),
                    ys.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ),
                Band::Std if ys.len() > 1 => {
                    let sd =
                        (ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
                    (mean - sd, mean + sd)
                }
                _ => (mean, mean),
            };
            GroupPoint {
                step,
                x: xs.iter().sum::<f64>() / n,
                mean,
                lo,
                hi,
                runs: ys.len(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------- markdown

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |x| format!("{x:.digits$}"))
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Mean and sample standard deviation (None for n = 1).
fn mean_std(xs: &[f64]) -> Option<(f64, Option<f64>)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = (xs.len() > 1)
        .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    Some((mean, std))
}

/// `mean ± std` of the values the runs have, noting runs without one.
fn fmt_group(values: &[Option<f64>], digits: usize) -> String {
    let xs: Vec<f64> = values.iter().flatten().copied().collect();
    let mut s = match mean_std(&xs) {
        None => return "–".to_string(),
        Some((m, sd)) => format!("{m:.digits$} ± {}", fmt_opt(sd, digits)),
    };
    if xs.len() < values.len() {
        let _ = write!(s, " ({} of {})", xs.len(), values.len());
    }
    s
}

fn markdown_table(runs: &[Run], last: usize) -> String {
    let mut out = String::new();
    let (final_what, final_head) = if last == 1 {
        (
            "final (last evaluated)".to_string(),
            "final eval accuracy".to_string(),
        )
    } else {
        (
            format!("final (mean of the last {last} evaluations)"),
            format!("final eval accuracy (last {last})"),
        )
    };
    let _ = write!(
        out,
        "Per run: meta-steps completed; {final_what} and best held-out eval \
         accuracy; rollout reward mean and policy entropy over the last tenth of the \
         steps that had rollouts; wall-clock seconds at the last step. \"–\": never \
         measured.\n\n",
    );
    let _ = writeln!(
        out,
        "| run | group | steps | {final_head} | best eval accuracy | late reward mean | late entropy | wall time (s) |",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            md_cell(&r.folder),
            md_cell(&r.group),
            r.steps(),
            fmt_opt(r.last_evals(last), 3),
            fmt_opt(r.best_eval(), 3),
            fmt_opt(r.late_reward(), 3),
            fmt_opt(r.late_entropy(), 3),
            fmt_opt(r.wall_time(), 1),
        );
    }

    let groups = groups_in_order(runs);
    let grouped = groups
        .iter()
        .any(|g| runs.iter().filter(|r| &r.group == g).count() > 1);
    if grouped {
        out.push_str(
            "\nPer group: number of runs (seeds); mean ± sample standard deviation over \
             those runs (\"–\" for a single run; \"(k of n)\" when only k runs have the value).\n\n",
        );
        let _ = writeln!(
            out,
            "| group | runs | {final_head} | best eval accuracy | late reward mean | late entropy | wall time (s) |",
        );
        out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for g in &groups {
            let group: Vec<&Run> = runs.iter().filter(|r| &r.group == g).collect();
            let col = |f: fn(&Run) -> Option<f64>| group.iter().map(|r| f(r)).collect::<Vec<_>>();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                md_cell(g),
                group.len(),
                fmt_group(
                    &group.iter().map(|r| r.last_evals(last)).collect::<Vec<_>>(),
                    3
                ),
                fmt_group(&col(Run::best_eval), 3),
                fmt_group(&col(Run::late_reward), 3),
                fmt_group(&col(Run::late_entropy), 3),
                fmt_group(&col(Run::wall_time), 1),
            );
        }
    }
    out
}

// ---------------------------------------------------------------- paired

/// Resamples of the percentile bootstrap.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// The mean of `diffs` and a percentile-bootstrap 95 % interval of it
/// ([`BOOTSTRAP_RESAMPLES`] resamples with replacement, a fixed RNG seed so
/// the table reproduces). `None` for no differences.
pub fn bootstrap_mean_ci(diffs: &[f64]) -> Option<(f64, f64, f64)> {
    use rand::{Rng, SeedableRng};
    if diffs.is_empty() {
        return None;
    }
    let n = diffs.len();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xB007);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| (0..n).map(|_| diffs[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    Some((mean, at(0.025), at(0.975)))
}

/// The mean and interval of `diffs`, noting when only some of the `pairs`
/// have a difference.
fn fmt_ci(diffs: &[f64], pairs: usize) -> String {
    match bootstrap_mean_ci(diffs) {
        None => "–".to_string(),
        Some((m, lo, hi)) if diffs.len() < pairs => {
            format!("{m:+.3} [{lo:+.3}, {hi:+.3}] ({} of {pairs})", diffs.len())
        }
        Some((m, lo, hi)) => format!("{m:+.3} [{lo:+.3}, {hi:+.3}]"),
    }
}

/// Paired differences baseline − group per shared seed, and time to the
/// threshold (see the module doc).
fn paired_table(runs: &[Run], baseline: &str, opts: &Options) -> Result<String, String> {
    let groups = groups_in_order(runs);
    if !groups.iter().any(|g| g == baseline) {
        return Err(format!(
            "--baseline {baseline}: no such group among the runs (groups: {})",
            groups.join(", ")
        ));
    }
    let seeded = |g: &str| -> BTreeMap<u64, &Run> {
        runs.iter()
            .filter(|r| r.group == g)
            .filter_map(|r| Some((r.seed?, r)))
            .collect()
    };
    let base = seeded(baseline);
    let last = opts.last;
    let mut out = String::new();
    let _ = write!(
        out,
        "\nPaired with `{baseline}` (runs with the same `train.seed`): {baseline} − group, the mean \
         over seeds and a percentile-bootstrap 95 % interval of that mean ({BOOTSTRAP_RESAMPLES} \
         resamples; with few seeds the interval is coarse). At equal steps: each run's {}. At \
         equal wall time / FLOPs: both runs read at the shorter one's end (its last evaluation \
         at or before that point; \"k of n\" when only k pairs have an evaluation by then).",
        if last == 1 {
            "final evaluation".to_string()
        } else {
            format!("mean of its last {last} evaluations")
        }
    );
    if let Some(t) = opts.threshold {
        let _ = write!(
            out,
            " Time / FLOPs to {t}: mean over the runs that first evaluate at ≥ {t} \
             (\"k of n\" when not all do)."
        );
    }
    out.push_str("\n\n| group | seeds | at equal steps | at equal wall time | at equal FLOPs |");
    if opts.threshold.is_some() {
        out.push_str(" time to threshold (s) | GFLOP to threshold |");
    }
    out.push('\n');
    out.push_str("|---|---:|---:|---:|---:|");
    if opts.threshold.is_some() {
        out.push_str("---:|---:|");
    }
    out.push('\n');
    for g in &groups {
        let mut diffs: [Vec<f64>; 3] = Default::default();
        let mine = seeded(g);
        let pairs: Vec<(&Run, &Run)> = base
            .iter()
            .filter_map(|(seed, b)| Some((*b, *mine.get(seed)?)))
            .collect();
        if g != baseline {
            for (b, r) in &pairs {
                if let (Some(x), Some(y)) = (b.last_evals(last), r.last_evals(last)) {
                    diffs[0].push(x - y);
                }
                for (i, axis) in [(1, XAxis::Time), (2, XAxis::Flops)] {
                    let (Some(eb), Some(er)) = (b.end(axis), r.end(axis)) else {
                        continue;
                    };
                    let at = eb.min(er);
                    if let (Some(x), Some(y)) = (b.eval_at(axis, at), r.eval_at(axis, at)) {
                        diffs[i].push(x - y);
                    }
                }
            }
        }
        let cell = |d: &Vec<f64>| {
            if g == baseline {
                "–".to_string()
            } else {
                fmt_ci(d, pairs.len())
            }
        };
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} |",
            md_cell(g),
            if g == baseline {
                base.len()
            } else {
                pairs.len()
            },
            cell(&diffs[0]),
            cell(&diffs[1]),
            cell(&diffs[2]),
        );
        if let Some(t) = opts.threshold {
            let all: Vec<&Run> = runs.iter().filter(|r| &r.group == g).collect();
            let reach = |axis: XAxis, scale: f64| {
                let v: Vec<Option<f64>> = all
                    .iter()
                    .map(|r| r.first_reaching(axis, t).map(|x| x * scale))
                    .collect();
                if v.iter().all(Option::is_none) {
                    format!("never (0 of {})", v.len())
                } else {
                    fmt_group(&v, 1)
                }
            };
            let _ = write!(
                out,
                " {} | {} |",
                reach(XAxis::Time, 1.0),
                reach(XAxis::Flops, 1e-9)
            );
        }
        out.push('\n');
    }
    Ok(out)
}

// ---------------------------------------------------------------- figure

/// Colour by group; past ten groups the colours repeat with a dash pattern.
#[derive(Clone, Copy)]
struct LineLook {
    color: RGBColor,
    /// (dash, gap) in pixels; None for a solid line.
    dash: Option<(u32, u32)>,
}

const DASHES: [Option<(u32, u32)>; 4] = [None, Some((10, 6)), Some((3, 4)), Some((16, 4))];

fn look(group_index: usize) -> LineLook {
    LineLook {
        color: PALETTE[group_index % PALETTE.len()],
        dash: DASHES[(group_index / PALETTE.len()) % DASHES.len()],
    }
}

struct Panel {
    title: String,
    x: XAxis,
    y: Quantity,
    y_desc: &'static str,
    smooth: bool,
    /// Mark every point (sparse series such as evaluations).
    markers: bool,
    empty_note: &'static str,
}

fn panels(x: XAxis) -> [Panel; 4] {
    let other = if x == XAxis::Time {
        XAxis::Step
    } else {
        XAxis::Time
    };
    let eval = |x: XAxis| Panel {
        title: format!("Held-out eval accuracy vs {}", x.name()),
        x,
        y: Quantity::Eval,
        y_desc: "eval accuracy",
        smooth: false,
        markers: true,
        empty_note: "no held-out evaluations in these runs",
    };
    [
        eval(x),
        eval(other),
        Panel {
            title: format!("Rollout reward mean vs {}", x.name()),
            x,
            y: Quantity::Reward,
            y_desc: "reward mean",
            smooth: true,
            markers: false,
            empty_note: "no rollouts in these runs",
        },
        Panel {
            title: format!("SFT loss vs {}", x.name()),
            x,
            y: Quantity::Sft,
            y_desc: "SFT loss",
            smooth: true,
            markers: false,
            empty_note: "no SFT loss recorded",
        },
    ]
}

fn register_font() -> Result<(), String> {
    static REGISTER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTER
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "the bundled DejaVu Sans font could not be loaded".to_string())
        })
        .clone()
}

type DrawResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[Run],
    opts: &Options,
) -> DrawResult<Vec<PanelView>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (w, _) = root.dim_in_pixel();
    let (title_area, body) = root.split_vertically(TITLE_HEIGHT);
    let groups = groups_in_order(runs);
    let title = format!(
        "coopc compare: {} run{} in {} group{}",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        groups.len(),
        if groups.len() == 1 { "" } else { "s" },
    );
    title_area.draw(&Text::new(
        title,
        (w as i32 / 2, TITLE_HEIGHT as i32 / 2),
        (FONT, 26)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    let (grid, legend) = body.split_horizontally(w.saturating_sub(LEGEND_WIDTH));
    let members: Vec<Vec<&Run>> = groups
        .iter()
        .map(|g| runs.iter().filter(|r| &r.group == g).collect())
        .collect();
    let mut views = Vec::new();
    for (area, panel) in grid.split_evenly((2, 2)).iter().zip(panels(opts.x).iter()) {
        let smooth = if panel.smooth { opts.smooth } else { 0.0 };
        let lines: Vec<GroupLine> = groups
            .iter()
            .zip(&members)
            .map(|(g, m)| GroupLine {
                group: g.clone(),
                runs: m.len(),
                points: group_line(m, panel.y, panel.x, smooth, opts.band),
            })
            .collect();
        views.push(draw_panel(area, panel, runs, lines, opts)?);
    }
    draw_legend(&legend, &groups, &members, opts)?;
    Ok(views)
}

/// A tick label without trailing zeros ("2", "0.25", "-1"); large values
/// in scientific notation ("1.5e12").
fn tick(v: f64) -> String {
    if v != 0.0 && v.abs() >= 1e6 {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = m.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{e}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn padded(lo: f64, hi: f64, frac: f64, min_span: f64) -> (f64, f64) {
    if hi - lo < min_span {
        let mid = (lo + hi) / 2.0;
        return (mid - min_span / 2.0, mid + min_span / 2.0);
    }
    let pad = (hi - lo) * frac;
    (lo - pad, hi + pad)
}

/// An axis-aligned rectangle in data coordinates.
#[derive(Clone, Copy, Debug)]
pub struct Rect {
    pub x0: f64,
    pub x1: f64,
    pub y0: f64,
    pub y1: f64,
}

impl Rect {
    fn contains(&self, (x, y): (f64, f64)) -> bool {
        (self.x0..=self.x1).contains(&x) && (self.y0..=self.y1).contains(&y)
    }
}

/// The parts of a polyline inside `r` (Liang–Barsky on each segment): one
/// polyline per stretch that stays inside.
pub fn clip_polyline(pts: &[(f64, f64)], r: Rect) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    if pts.len() == 1 && r.contains(pts[0]) {
        return vec![pts.to_vec()];
    }
    for seg in pts.windows(2) {
        let Some((a, b)) = clip_segment(seg[0], seg[1], r) else {
            if current.len() > 1 {
                out.push(std::mem::take(&mut current));
            }
            current.clear();
            continue;
        };
        if current.last() != Some(&a) {
            if current.len() > 1 {
                out.push(std::mem::take(&mut current));
            }
            current.clear();
            current.push(a);
        }
        current.push(b);
        // Leaving the rectangle ends the stretch.
        if b != seg[1] {
            out.push(std::mem::take(&mut current));
        }
    }
    if current.len() > 1 {
        out.push(current);
    }
    out
}

fn clip_segment(a: (f64, f64), b: (f64, f64), r: Rect) -> Option<((f64, f64), (f64, f64))> {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [
        (-dx, a.0 - r.x0),
        (dx, r.x1 - a.0),
        (-dy, a.1 - r.y0),
        (dy, r.y1 - a.1),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let t = q / p;
            if p < 0.0 {
                t0 = t0.max(t);
            } else {
                t1 = t1.min(t);
            }
        }
    }
    if t0 > t1 {
        return None;
    }
    let at = |t: f64| {
        if t == 0.0 {
            a
        } else if t == 1.0 {
            b
        } else {
            (a.0 + t * dx, a.1 + t * dy)
        }
    };
    Some((at(t0), at(t1)))
}

/// A polygon cut to `r` (Sutherland–Hodgman; the rectangle is convex).
pub fn clip_polygon(poly: &[(f64, f64)], r: Rect) -> Vec<(f64, f64)> {
    type Inside = fn((f64, f64), &Rect) -> bool;
    type Cross = fn((f64, f64), (f64, f64), &Rect) -> (f64, f64);
    let edges: [(Inside, Cross); 4] = [
        (
            |p, r| p.0 >= r.x0,
            |a, b, r| (r.x0, a.1 + (b.1 - a.1) * (r.x0 - a.0) / (b.0 - a.0)),
        ),
        (
            |p, r| p.0 <= r.x1,
            |a, b, r| (r.x1, a.1 + (b.1 - a.1) * (r.x1 - a.0) / (b.0 - a.0)),
        ),
        (
            |p, r| p.1 >= r.y0,
            |a, b, r| (a.0 + (b.0 - a.0) * (r.y0 - a.1) / (b.1 - a.1), r.y0),
        ),
        (
            |p, r| p.1 <= r.y1,
            |a, b, r| (a.0 + (b.0 - a.0) * (r.y1 - a.1) / (b.1 - a.1), r.y1),
        ),
    ];
    let mut out = poly.to_vec();
    for (inside, cross) in edges {
        if out.is_empty() {
            break;
        }
        let input = std::mem::take(&mut out);
        let mut prev = *input.last().expect("non-empty");
        for &p in &input {
            match (inside(p, &r), inside(prev, &r)) {
                (true, true) => out.push(p),
                (true, false) => {
                    out.push(cross(prev, p, &r));
                    out.push(p);
                }
                (false, true) => out.push(cross(prev, p, &r)),
                (false, false) => {}
            }
            prev = p;
        }
    }
    out
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    runs: &[Run],
    lines: Vec<GroupLine>,
    opts: &Options,
) -> DrawResult<PanelView>
where
    DB::ErrorType: 'static,
{
    // The x axis spans every row of every run (panels with the same x
    // quantity share it), from 0.
    let x_max = runs
        .iter()
        .flat_map(|r| r.rows.iter().filter_map(|row| panel.x.of(row)))
        .fold(f64::NEG_INFINITY, f64::max);
    let x_range = if x_max.is_finite() && x_max > 0.0 {
        (-x_max * 0.01, x_max * 1.02)
    } else {
        (0.0, 1.0)
    };
    let drawn = || {
        lines
            .iter()
            .flat_map(|l| l.points.iter())
            .flat_map(|p| [p.lo, p.mean, p.hi])
    };
    let y_range = opts.ylim(panel.y).unwrap_or_else(|| {
        if panel.y == Quantity::Eval {
            // Accuracy: the whole [0, 1], with room for markers at the ends.
            return (-0.04, 1.04);
        }
        let lo = drawn().fold(f64::INFINITY, f64::min);
        let hi = drawn().fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() {
            padded(lo, hi, 0.06, 1e-6_f64.max(hi.abs().max(lo.abs()) * 0.1))
        } else {
            (0.0, 1.0)
        }
    });
    let rect = Rect {
        x0: x_range.0,
        x1: x_range.1,
        y0: y_range.0,
        y1: y_range.1,
    };

    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 20))
        .margin(12)
        .margin_right(22)
        .x_label_area_size(48)
        .y_label_area_size(66)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;
    chart
        .configure_mesh()
        .x_desc(panel.x.desc())
        .y_desc(panel.y_desc)
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;

    let plot_area = chart.plotting_area().get_pixel_range();
    // Markers stay whole inside the plotting area: a marker whose centre
    // is within this many pixels of an edge is not drawn.
    const MARKER: i32 = 4;
    let (px, py) = plot_area.clone();
    let marker_fits = |p: (f64, f64)| {
        let (cx, cy) = chart.backend_coord(&p);
        rect.contains(p)
            && cx - MARKER >= px.start
            && cx + MARKER < px.end
            && cy - MARKER >= py.start
            && cy + MARKER < py.end
    };
    let markers: Vec<Vec<(f64, f64)>> = lines
        .iter()
        .map(|l| {
            l.points
                .iter()
                .map(|p| (p.x, p.mean))
                .filter(|&p| marker_fits(p))
                .collect()
        })
        .collect();

    // Bands first, then lines and markers on top.
    for (i, line) in lines.iter().enumerate() {
        let pts = &line.points;
        let has_band = line.runs > 1 && opts.band != Band::None && pts.len() > 1;
        if has_band {
            let mut poly: Vec<(f64, f64)> = pts.iter().map(|p| (p.x, p.hi)).collect();
            poly.extend(pts.iter().rev().map(|p| (p.x, p.lo)));
            let clipped = clip_polygon(&poly, rect);
            if clipped.len() > 2 {
                chart.draw_series(std::iter::once(Polygon::new(
                    clipped,
                    look(i).color.mix(BAND_ALPHA).filled(),
                )))?;
            }
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let lk = look(i);
        let pts: Vec<(f64, f64)> = line.points.iter().map(|p| (p.x, p.mean)).collect();
        if pts.is_empty() {
            continue;
        }
        let style = lk.color.stroke_width(2);
        for part in clip_polyline(&pts, rect) {
            match lk.dash {
                None => {
                    chart.draw_series(LineSeries::new(part, style))?;
                }
                Some((dash, gap)) => {
                    chart.draw_series(DashedLineSeries::new(part, dash, gap, style))?;
                }
            }
        }
        if panel.markers || pts.len() == 1 {
            chart.draw_series(
                markers[i]
                    .iter()
                    .map(|&p| Circle::new(p, MARKER as u32, lk.color.filled())),
            )?;
        }
    }
    if lines.iter().all(|l| l.points.is_empty()) {
        let centre = ((x_range.0 + x_range.1) / 2.0, (y_range.0 + y_range.1) / 2.0);
        chart.plotting_area().draw(&Text::new(
            panel.empty_note,
            centre,
            (FONT, 16)
                .into_font()
                .color(&RGBColor(110, 110, 110))
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
    }
    Ok(PanelView {
        title: panel.title.clone(),
        plot_area,
        cell: area.get_pixel_range(),
        x_range,
        y_range,
        lines,
    })
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    groups: &[String],
    members: &[Vec<&Run>],
    opts: &Options,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    let top = 40;
    let left = 10;
    let sample = 44;
    let text_x = left + sample + 10;
    let max_text = (w - text_x - 8).max(20) as u32;
    let notes = 5;
    let step = ((h - top - 24 * notes) / groups.len().max(1) as i32).clamp(12, 26);
    let size = if step < 18 { 12 } else { 15 };
    let font = (FONT, size).into_font().color(&BLACK);
    let grey = RGBColor(90, 90, 90);
    let note_font = (FONT, 13).into_font().color(&grey);

    area.draw(&Text::new(
        "Groups (runs)",
        (left, 12),
        (FONT, 16).into_font().color(&BLACK),
    ))?;
    let mut y_end = top;
    for (i, (group, runs)) in groups.iter().zip(members).enumerate() {
        let y = top + i as i32 * step + step / 2;
        if y > h - 24 * notes {
            let more = groups.len() - i;
            area.draw(&Text::new(
                format!("… and {more} more"),
                (left, y - step / 2),
                font.clone().pos(Pos::new(HPos::Left, VPos::Top)),
            ))?;
            y_end = y + step / 2;
            break;
        }
        let lk = look(i);
        if runs.len() > 1 && opts.band != Band::None {
            area.draw(&Rectangle::new(
                [(left, y - 6), (left + sample, y + 6)],
                lk.color.mix(BAND_ALPHA).filled(),
            ))?;
        }
        let seg = [(left, y), (left + sample, y)];
        let style = lk.color.stroke_width(2);
        match lk.dash {
            None => area.draw(&PathElement::new(seg, style))?,
            Some((dash, gap)) => area.draw(&DashedPathElement::new(seg, dash, gap, style))?,
        }
        let label = fit_text(area, &format!("{group} ({})", runs.len()), &font, max_text);
        area.draw(&Text::new(
            label,
            (text_x, y),
            font.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        y_end = y + step / 2;
    }
    let band = match opts.band {
        Band::Minmax => "band: min–max over runs",
        Band::Std => "band: mean ± 1 std over runs",
        Band::None => "no band",
    };
    let smoothing = if opts.smooth > 0.0 {
        format!("reward, SFT loss: EMA {}", tick(opts.smooth))
    } else {
        "no smoothing".to_string()
    };
    let mut y = y_end + 16;
    for note in ["line: mean over a group's runs", band, &smoothing] {
        let text = fit_text(area, note, &note_font, (w - left - 8).max(20) as u32);
        area.draw(&Text::new(
            text,
            (left, y),
            note_font.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        y += 20;
    }
    area.draw(&Circle::new((left + sample / 2, y + 2), 4, grey.filled()))?;
    area.draw(&Text::new(
        "held-out evaluation",
        (text_x, y + 2),
        note_font.pos(Pos::new(HPos::Left, VPos::Center)),
    ))?;
    Ok(())
}

/// `text`, shortened with an ellipsis to fit `max_width` pixels.
fn fit_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    font: &TextStyle,
    max_width: u32,
) -> String {
    let fits = |s: &str| {
        area.estimate_text_size(s, font)
            .map(|(w, _)| w <= max_width)
            .unwrap_or(true)
    };
    if fits(text) {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut n = chars.len();
    while n > 1 {
        n -= 1;
        let s: String = chars[..n].iter().collect::<String>() + "…";
        if fits(&s) {
            return s;
        }
    }
    "…".to_string()
}

// ---------------------------------------------------------------- text

/// A backend that renders text itself with the bundled font and forwards
/// everything else. plotters' own ab_glyph renderer places each glyph at the
/// pen position without its left side bearing, which leaves uneven gaps
/// between letters ("S FT"); here every glyph keeps its outline's position,
/// and kerning is applied. The text box spans the font's ascent to descent,
/// so anchors centre the text as a whole.
struct GlyphText<DB> {
    inner: DB,
    font: FontRef<'static>,
}

impl<DB: DrawingBackend> GlyphText<DB> {
    fn new(inner: DB) -> Result<Self, String> {
        let font = FontRef::try_from_slice(DEJAVU_SANS)
            .map_err(|e| format!("the bundled DejaVu Sans font could not be loaded: {e}"))?;
        Ok(GlyphText { inner, font })
    }

    /// Glyphs positioned on a baseline at the box's ascent, and the box size.
    fn layout(&self, text: &str, size: f64) -> (Vec<ab_glyph::Glyph>, (u32, u32)) {
        let scale = PxScale::from(size as f32);
        let scaled = self.font.as_scaled(scale);
        let ascent = scaled.ascent();
        let mut glyphs = Vec::with_capacity(text.len());
        let mut caret = 0.0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = prev {
                caret += scaled.kern(p, id);
            }
            glyphs.push(id.with_scale_and_position(scale, point(caret, ascent)));
            caret += scaled.h_advance(id);
            prev = Some(id);
        }
        let height = scaled.ascent() - scaled.descent();
        (
            glyphs,
            (caret.ceil().max(0.0) as u32, height.ceil().max(0.0) as u32),
        )
    }
}

impl<DB: DrawingBackend> DrawingBackend for GlyphText<DB> {
    type ErrorType = DB::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        (iw, ih): (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.blit_bitmap(pos, (iw, ih), src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        Ok(self.layout(text, style.size()).1)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let (glyphs, (width, height)) = self.layout(text, style.size());
        let (width, height) = (width as i32, height as i32);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Center => -width / 2,
            HPos::Right => -width,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        let inner = &mut self.inner;
        let mut failed = None;
        for glyph in glyphs {
            let Some(outline) = self.font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            let (x0, y0) = (bounds.min.x as i32 + dx, bounds.min.y as i32 + dy);
            outline.draw(|x, y, coverage| {
                if coverage <= 0.0 || failed.is_some() {
                    return;
                }
                let (tx, ty) = transform.transform(x0 + x as i32, y0 + y as i32);
                let c = BackendColor {
                    alpha: color.alpha * f64::from(coverage.min(1.0)),
                    rgb: color.rgb,
                };
                if let Err(e) = inner.draw_pixel((pos.0 + tx, pos.1 + ty), c) {
                    failed = Some(e);
                }
            });
        }
        failed.map_or(Ok(()), Err)
    }
}
