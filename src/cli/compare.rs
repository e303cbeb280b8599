//! `coopc compare DIR…`: plots several runs' `metrics.jsonl` side by side and
//! summarises them in a markdown table.
//!
//! The figure is a 2×2 grid — held-out eval accuracy against meta-step and
//! against wall time, rollout reward mean and SFT loss against meta-step —
//! with one line per run and a shared legend on the right. Runs of the same
//! method share a colour and are told apart by their dash pattern. Text is
//! rendered with the bundled DejaVu Sans (`assets/fonts/`), so the output does
//! not depend on the fonts installed on the machine.
//!
//! The table has one row per run; when several runs share a method (seeds), a
//! second table gives per-method mean ± sample standard deviation of the final
//! eval accuracy and of the wall time.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use coopc_train::Metrics;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Size of the written PNG, in pixels.
pub const PNG_SIZE: (u32, u32) = (1400, 900);

const FONT: &str = "sans-serif";
const DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const LEGEND_WIDTH: u32 = 290;
const TITLE_HEIGHT: u32 = 44;

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

/// One metrics row, as the trainer writes it.
type Row = Metrics;

struct Run {
    folder: String,
    method: String,
    rows: Vec<Row>,
}

impl Run {
    fn label(&self) -> String {
        format!("{} ({})", self.method, self.folder)
    }
    fn last_step(&self) -> usize {
        self.rows.last().map_or(0, |r| r.step)
    }
    fn final_eval(&self) -> Option<f64> {
        self.rows.iter().rev().find_map(|r| finite(r.eval_accuracy))
    }
    fn best_eval(&self) -> Option<f64> {
        self.rows
            .iter()
            .filter_map(|r| finite(r.eval_accuracy))
            .fold(None, |best, v| Some(best.map_or(v, |b: f64| b.max(v))))
    }
    fn final_reward(&self) -> Option<f64> {
        self.rows.iter().rev().find_map(|r| finite(r.reward_mean))
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

/// Reads the runs in `dirs`, writes the comparison figure to `png` and returns
/// the markdown summary (also written to `markdown` when given).
///
/// Each entry of `dirs` is a run folder holding `metrics.jsonl` (a path to
/// the `metrics.jsonl` itself is accepted too). Errors name the folder or
/// file, and the line for a malformed row.
pub fn compare(dirs: &[PathBuf], png: &Path, markdown: Option<&Path>) -> Result<String, String> {
    if dirs.is_empty() {
        return Err("compare needs at least one run folder".to_string());
    }
    let runs = dirs
        .iter()
        .map(|d| load_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    let table = markdown_table(&runs);
    plot(&runs, png)?;
    if let Some(md) = markdown {
        ensure_parent(md)?;
        std::fs::write(md, &table).map_err(|e| format!("{}: {e}", md.display()))?;
    }
    Ok(table)
}

fn load_run(dir: &Path) -> Result<Run, String> {
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
    let method = rows[0].method.clone();
    Ok(Run {
        folder: folder_name(&folder_path),
        method,
        rows,
    })
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

fn fmt_mean_std(xs: &[f64], digits: usize) -> String {
    match mean_std(xs) {
        None => "–".to_string(),
        Some((m, s)) => format!("{m:.digits$} ± {}", fmt_opt(s, digits)),
    }
}

fn markdown_table(runs: &[Run]) -> String {
    let mut out = String::new();
    out.push_str(
        "Per run: meta-steps completed; final (last evaluated) and best held-out eval \
         accuracy; rollout reward mean at the last step that had rollouts; \
         wall-clock seconds at the last step. \"–\": never measured.\n\n",
    );
    out.push_str(
        "| run | method | steps | final eval accuracy | best eval accuracy | final reward mean | wall time (s) |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|\n");
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            md_cell(&r.folder),
            md_cell(&r.method),
            r.last_step(),
            fmt_opt(r.final_eval(), 3),
            fmt_opt(r.best_eval(), 3),
            fmt_opt(r.final_reward(), 3),
            fmt_opt(r.wall_time(), 1),
        );
    }

    let methods = methods_in_order(runs);
    let grouped = methods
        .iter()
        .any(|m| runs.iter().filter(|r| &r.method == m).count() > 1);
    if grouped {
        out.push_str(
            "\nPer method: number of runs (seeds); mean ± sample standard deviation over \
             those runs of the final held-out eval accuracy and of the wall time \
             (\"–\" for a single run).\n\n",
        );
        out.push_str(
            "| method | runs | final eval accuracy (mean ± std) | wall time (s) (mean ± std) |\n",
        );
        out.push_str("|---|---:|---:|---:|\n");
        for m in &methods {
            let group: Vec<&Run> = runs.iter().filter(|r| &r.method == m).collect();
            let accs: Vec<f64> = group.iter().filter_map(|r| r.final_eval()).collect();
            let walls: Vec<f64> = group.iter().filter_map(|r| r.wall_time()).collect();
            let mut acc = fmt_mean_std(&accs, 3);
            if !accs.is_empty() && accs.len() < group.len() {
                let _ = write!(acc, " ({} of {} evaluated)", accs.len(), group.len());
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                md_cell(m),
                group.len(),
                acc,
                fmt_mean_std(&walls, 1),
            );
        }
    }
    out
}

fn methods_in_order(runs: &[Run]) -> Vec<String> {
    let mut methods: Vec<String> = Vec::new();
    for r in runs {
        if !methods.contains(&r.method) {
            methods.push(r.method.clone());
        }
    }
    methods
}

// ---------------------------------------------------------------- figure

/// Colour by method, dash pattern by the run's index within its method.
#[derive(Clone, Copy)]
struct LineLook {
    color: RGBColor,
    /// (dash, gap) in pixels; None for a solid line.
    dash: Option<(u32, u32)>,
}

const DASHES: [Option<(u32, u32)>; 4] = [None, Some((10, 6)), Some((3, 4)), Some((16, 4))];

fn looks(runs: &[Run]) -> Vec<LineLook> {
    let methods = methods_in_order(runs);
    let mut seen = vec![0usize; methods.len()];
    runs.iter()
        .map(|r| {
            let m = methods.iter().position(|m| m == &r.method).unwrap_or(0);
            let k = seen[m];
            seen[m] += 1;
            LineLook {
                color: PALETTE[m % PALETTE.len()],
                dash: DASHES[k % DASHES.len()],
            }
        })
        .collect()
}

struct Panel {
    title: &'static str,
    x_desc: &'static str,
    y_desc: &'static str,
    /// The x coordinate of a row; the axis spans it over every row of every
    /// run, so panels sharing an x quantity share the axis.
    x: fn(&Row) -> Option<f64>,
    point: fn(&Row) -> Option<(f64, f64)>,
    /// Fixed y range (accuracy); otherwise fitted to the data.
    y_range: Option<(f64, f64)>,
    /// Mark every point (sparse series such as evaluations).
    markers: bool,
    empty_note: &'static str,
}

fn pair(x: Option<f64>, y: Option<f64>) -> Option<(f64, f64)> {
    Some((finite(x)?, finite(y)?))
}

const PANELS: [Panel; 4] = [
    Panel {
        title: "Held-out eval accuracy vs meta-step",
        x_desc: "meta-step",
        y_desc: "eval accuracy",
        x: |r| Some(r.step as f64),
        point: |r| pair(Some(r.step as f64), r.eval_accuracy),
        y_range: Some((0.0, 1.0)),
        markers: true,
        empty_note: "no held-out evaluations in these runs",
    },
    Panel {
        title: "Held-out eval accuracy vs wall time",
        x_desc: "wall time (s)",
        y_desc: "eval accuracy",
        x: |r| Some(r.wall_time_s),
        point: |r| pair(Some(r.wall_time_s), r.eval_accuracy),
        y_range: Some((0.0, 1.0)),
        markers: true,
        empty_note: "no held-out evaluations in these runs",
    },
    Panel {
        title: "Rollout reward mean vs meta-step",
        x_desc: "meta-step",
        y_desc: "reward mean",
        x: |r| Some(r.step as f64),
        point: |r| pair(Some(r.step as f64), r.reward_mean),
        y_range: None,
        markers: false,
        empty_note: "no rollouts in these runs",
    },
    Panel {
        title: "SFT loss vs meta-step",
        x_desc: "meta-step",
        y_desc: "SFT loss",
        x: |r| Some(r.step as f64),
        point: |r| pair(Some(r.step as f64), Some(r.sft_loss)),
        y_range: None,
        markers: false,
        empty_note: "no SFT loss recorded",
    },
];

fn register_font() -> Result<(), String> {
    static REGISTER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTER
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "the bundled DejaVu Sans font could not be loaded".to_string())
        })
        .clone()
}

fn plot(runs: &[Run], png_path: &Path) -> Result<(), String> {
    register_font()?;
    let (w, h) = PNG_SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let backend = GlyphText::new(BitMapBackend::with_buffer(&mut buf, (w, h)))?;
        let root = backend.into_drawing_area();
        draw_figure(&root, runs)
            .map_err(|e| format!("{}: drawing failed: {e}", png_path.display()))?;
        root.present()
            .map_err(|e| format!("{}: drawing failed: {e}", png_path.display()))?;
    }
    ensure_parent(png_path)?;
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| format!("{}: {e}", png_path.display()))?;
        writer
            .write_image_data(&buf)
            .map_err(|e| format!("{}: {e}", png_path.display()))?;
    }
    std::fs::write(png_path, bytes).map_err(|e| format!("{}: {e}", png_path.display()))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw_figure<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[Run]) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (w, _) = root.dim_in_pixel();
    let (title_area, body) = root.split_vertically(TITLE_HEIGHT);
    let title = format!(
        "coopc compare: {} run{}",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" }
    );
    title_area.draw(&Text::new(
        title,
        (w as i32 / 2, TITLE_HEIGHT as i32 / 2),
        (FONT, 26)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    let (grid, legend) = body.split_horizontally(w - LEGEND_WIDTH);
    let looks = looks(runs);
    for (area, panel) in grid.split_evenly((2, 2)).iter().zip(PANELS.iter()) {
        draw_panel(area, panel, runs, &looks)?;
    }
    draw_legend(&legend, runs, &looks)
}

/// A tick label without trailing zeros ("2", "0.25", "-1").
fn tick(v: f64) -> String {
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

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    runs: &[Run],
    looks: &[LineLook],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let series: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| r.rows.iter().filter_map(panel.point).collect())
        .collect();
    let all = || series.iter().flatten();
    let x_max = runs
        .iter()
        .flat_map(|r| r.rows.iter().filter_map(|row| finite((panel.x)(row))))
        .fold(f64::NEG_INFINITY, f64::max);
    let x_range = if x_max.is_finite() && x_max > 0.0 {
        (0.0, x_max * 1.02)
    } else {
        (0.0, 1.0)
    };
    let y_range = panel.y_range.unwrap_or_else(|| {
        let lo = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() {
            padded(lo, hi, 0.06, 1e-6_f64.max(hi.abs().max(lo.abs()) * 0.1))
        } else {
            (0.0, 1.0)
        }
    });

    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, (FONT, 20))
        .margin(12)
        .margin_right(22)
        .x_label_area_size(48)
        .y_label_area_size(66)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;
    chart
        .configure_mesh()
        .x_desc(panel.x_desc)
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

    for (pts, look) in series.iter().zip(looks) {
        if pts.is_empty() {
            continue;
        }
        let style = look.color.stroke_width(2);
        match look.dash {
            None => {
                chart.draw_series(LineSeries::new(pts.iter().copied(), style))?;
            }
            Some((dash, gap)) => {
                chart.draw_series(DashedLineSeries::new(pts.iter().copied(), dash, gap, style))?;
            }
        }
        if panel.markers || pts.len() == 1 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, look.color.filled())))?;
        }
    }
    if series.iter().all(|s| s.is_empty()) {
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
    Ok(())
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Run],
    looks: &[LineLook],
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
    let step = ((h - top - 48) / runs.len().max(1) as i32).clamp(12, 26);
    let size = if step < 18 { 12 } else { 15 };
    let font = (FONT, size).into_font().color(&BLACK);

    area.draw(&Text::new(
        "Runs: method (folder)",
        (left, 12),
        (FONT, 16).into_font().color(&BLACK),
    ))?;
    for (i, (run, look)) in runs.iter().zip(looks).enumerate() {
        let y = top + i as i32 * step + step / 2;
        if y > h - 8 {
            let more = runs.len() - i;
            area.draw(&Text::new(
                format!("… and {more} more"),
                (left, y - step / 2),
                font.clone().pos(Pos::new(HPos::Left, VPos::Top)),
            ))?;
            return Ok(());
        }
        let seg = [(left, y), (left + sample, y)];
        let style = look.color.stroke_width(2);
        match look.dash {
            None => area.draw(&PathElement::new(seg, style))?,
            Some((dash, gap)) => area.draw(&DashedPathElement::new(seg, dash, gap, style))?,
        }
        let label = fit_text(area, &run.label(), &font, max_text);
        area.draw(&Text::new(
            label,
            (text_x, y),
            font.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    let y = top + runs.len() as i32 * step + 12;
    area.draw(&Circle::new(
        (left + sample / 2, y + 8),
        4,
        RGBColor(90, 90, 90).filled(),
    ))?;
    area.draw(&Text::new(
        "held-out evaluation",
        (text_x, y + 8),
        (FONT, 13)
            .into_font()
            .color(&RGBColor(90, 90, 90))
            .pos(Pos::new(HPos::Left, VPos::Center)),
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
