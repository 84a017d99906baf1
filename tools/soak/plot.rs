//! The soak's plot, drawn here: stacked panels of time series on a white raster, axes with tick
//! labels in a 3x5 bitmap font, vertical markers (root rotations), written as PNG.

use std::path::Path;

/// One series: its name, its colour, its points (minutes, value).
pub type Series = (String, [u8; 3], Vec<(f64, f64)>);

/// One panel: a title and its series.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line of width 2 (Bresenham, thickened).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        self.line((x0, y0), (x1, y0), c);
        self.line((x1, y0), (x1, y1), c);
        self.line((x1, y1), (x0, y1), c);
        self.line((x0, y1), (x0, y0), c);
    }

    /// Text in the 3x5 font at scale 2 (each glyph 8 px wide with spacing).
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (r, row) in rows.iter().enumerate() {
                for (col, bit) in row.chars().enumerate() {
                    if bit == '#' {
                        for dy in 0..2 {
                            for dx in 0..2 {
                                self.set(
                                    x + i as i64 * 8 + col as i64 * 2 + dx,
                                    y + r as i64 * 2 + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A 3x5 glyph; unknown characters are blank.
fn glyph(c: char) -> [&'static str; 5] {
    match c {
        '0' => ["###", "#.#", "#.#", "#.#", "###"],
        '1' => [".#.", "##.", ".#.", ".#.", "###"],
        '2' => ["###", "..#", "###", "#..", "###"],
        '3' => ["###", "..#", ".##", "..#", "###"],
        '4' => ["#.#", "#.#", "###", "..#", "..#"],
        '5' => ["###", "#..", "###", "..#", "###"],
        '6' => ["###", "#..", "###", "#.#", "###"],
        '7' => ["###", "..#", ".#.", ".#.", ".#."],
        '8' => ["###", "#.#", "###", "#.#", "###"],
        '9' => ["###", "#.#", "###", "..#", "###"],
        'A' => [".#.", "#.#", "###", "#.#", "#.#"],
        'B' => ["##.", "#.#", "##.", "#.#", "##."],
        'C' => [".##", "#..", "#..", "#..", ".##"],
        'D' => ["##.", "#.#", "#.#", "#.#", "##."],
        'E' => ["###", "#..", "##.", "#..", "###"],
        'F' => ["###", "#..", "##.", "#..", "#.."],
        'G' => [".##", "#..", "#.#", "#.#", ".##"],
        'H' => ["#.#", "#.#", "###", "#.#", "#.#"],
        'I' => ["###", ".#.", ".#.", ".#.", "###"],
        'J' => ["..#", "..#", "..#", "#.#", ".#."],
        'K' => ["#.#", "#.#", "##.", "#.#", "#.#"],
        'L' => ["#..", "#..", "#..", "#..", "###"],
        'M' => ["#.#", "###", "###", "#.#", "#.#"],
        'N' => ["##.", "#.#", "#.#", "#.#", "#.#"],
        'O' => [".#.", "#.#", "#.#", "#.#", ".#."],
        'P' => ["##.", "#.#", "##.", "#..", "#.."],
        'Q' => [".#.", "#.#", "#.#", "##.", ".##"],
        'R' => ["##.", "#.#", "##.", "#.#", "#.#"],
        'S' => [".##", "#..", ".#.", "..#", "##."],
        'T' => ["###", ".#.", ".#.", ".#.", ".#."],
        'U' => ["#.#", "#.#", "#.#", "#.#", "###"],
        'V' => ["#.#", "#.#", "#.#", "#.#", ".#."],
        'W' => ["#.#", "#.#", "###", "###", "#.#"],
        'X' => ["#.#", "#.#", ".#.", "#.#", "#.#"],
        'Y' => ["#.#", "#.#", ".#.", ".#.", ".#."],
        'Z' => ["###", "..#", ".#.", "#..", "###"],
        '.' => ["...", "...", "...", "...", ".#."],
        ',' => ["...", "...", "...", ".#.", "#.."],
        ':' => ["...", ".#.", "...", ".#.", "..."],
        '-' => ["...", "...", "###", "...", "..."],
        '/' => ["..#", "..#", ".#.", "#..", "#.."],
        '%' => ["#.#", "..#", ".#.", "#..", "#.#"],
        '(' => [".#.", "#..", "#..", "#..", ".#."],
        ')' => [".#.", "..#", "..#", "..#", ".#."],
        '=' => ["...", "###", "...", "###", "..."],
        '+' => ["...", ".#.", "###", ".#.", "..."],
        _ => ["...", "...", "...", "...", "..."],
    }
}

/// A value for a tick label: at most 4 significant characters.
fn label(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws `panels` stacked over the same time axis (minutes, `0..=t_max`), with vertical
/// `markers` (minutes, label), and writes the PNG to `path`.
pub fn draw(
    path: &Path,
    title: &str,
    panels: &[Panel],
    markers: &[(f64, String)],
    t_max: f64,
) -> std::io::Result<()> {
    const W: usize = 1100;
    const PANEL_H: usize = 260;
    const LEFT: i64 = 90;
    const RIGHT: i64 = 30;
    const TOP: i64 = 50;
    let h = TOP as usize + panels.len() * (PANEL_H + 40) + 40;
    let mut c = Canvas::new(W, h);
    let black = [0, 0, 0];
    let grey = [200, 200, 200];
    let marker = [60, 90, 220];
    c.text(LEFT, 14, title, black);
    let t_max = t_max.max(1e-9);
    for (pi, p) in panels.iter().enumerate() {
        let y0 = TOP + (pi * (PANEL_H + 40)) as i64 + 20;
        let y1 = y0 + PANEL_H as i64;
        let (x0, x1) = (LEFT, W as i64 - RIGHT);
        let v_max = p
            .series
            .iter()
            .flat_map(|(_, _, pts)| pts.iter().map(|(_, v)| *v))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.15;
        // Grid and ticks: 5 horizontal, 10 vertical.
        for k in 0..=5 {
            let y = y1 - (k as i64 * (y1 - y0)) / 5;
            c.line((x0, y), (x1, y), grey);
            c.text(4, y - 5, &label(v_max * k as f64 / 5.0), black);
        }
        for k in 0..=10 {
            let x = x0 + (k as i64 * (x1 - x0)) / 10;
            c.line((x, y0), (x, y1), grey);
            if pi + 1 == panels.len() {
                c.text(x - 8, y1 + 8, &label(t_max * k as f64 / 10.0), black);
            }
        }
        c.rect(x0, y0, x1, y1, black);
        c.text(x0 + 6, y0 - 16, &p.title, black);
        let to_px = |(t, v): (f64, f64)| {
            (
                x0 + ((t / t_max) * (x1 - x0) as f64) as i64,
                y1 - ((v / v_max) * (y1 - y0) as f64) as i64,
            )
        };
        for (t, name) in markers {
            let (x, _) = to_px((*t, 0.0));
            c.line((x, y0), (x, y1), marker);
            if pi == 0 {
                c.text(x + 4, y0 + 6, name, marker);
            }
        }
        let mut legend_x = x1 - 10;
        for (name, colour, pts) in p.series.iter().rev() {
            for w in pts.windows(2) {
                c.line(to_px(w[0]), to_px(w[1]), *colour);
            }
            legend_x -= name.len() as i64 * 8 + 30;
            c.line((legend_x, y0 - 10), (legend_x + 16, y0 - 10), *colour);
            c.text(legend_x + 22, y0 - 16, name, *colour);
        }
    }
    c.text(W as i64 / 2 - 60, h as i64 - 22, "MINUTES", black);

    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(&c.px)
        .map_err(std::io::Error::other)?;
    Ok(())
}
