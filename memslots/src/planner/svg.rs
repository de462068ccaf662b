//! SVG drawings of guest physical maps (filled in below).
