#!/usr/bin/env bash
# Render autopar HTML reports to PNG in headless Chromium (Debian's `chromium` package, installed
# here when missing) and trim the blank space below the page.
#
#   scripts/screenshot_report.sh OUT_DIR report1.html [report2.html ...]
#
# Each report.html becomes OUT_DIR/report.png (1400 px wide, full page). With EXTRACT_FIGURES=1
# the figures embedded in each report are also saved as OUT_DIR/report-fig<N>.png.
# Environment: CHROMIUM (binary, default: chromium), WIDTH (1400), MAX_HEIGHT (16000),
# PYTHON (for trimming; needs Pillow, which matplotlib brings).
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 OUT_DIR report.html [report.html ...]" >&2
    exit 2
fi
out_dir=$1
shift
mkdir -p "$out_dir"
CHROMIUM=${CHROMIUM:-chromium}
WIDTH=${WIDTH:-1400}
MAX_HEIGHT=${MAX_HEIGHT:-16000}
PYTHON=${PYTHON:-python3}

if ! command -v "$CHROMIUM" >/dev/null 2>&1; then
    echo "installing Debian's chromium package" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

for html in "$@"; do
    name=$(basename "${html%.*}")
    png="$out_dir/$name.png"
    profile=$(mktemp -d)
    # A tall window captures the whole page; the blank rest is trimmed below.
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --hide-scrollbars --user-data-dir="$profile" \
        --screenshot="$png" --window-size="$WIDTH,$MAX_HEIGHT" \
        "file://$(realpath "$html")" >/dev/null 2>&1
    rm -rf "$profile"
    "$PYTHON" - "$png" "$html" "${EXTRACT_FIGURES:-0}" "$out_dir/$name" <<'PY'
import base64, re, sys
from PIL import Image, ImageChops

png, html, extract, stem = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
im = Image.open(png).convert("RGB")
background = Image.new("RGB", im.size, im.getpixel((2, im.height - 2)))
box = ImageChops.difference(im, background).getbbox()
if box is None:
    sys.exit(f"{png}: the page rendered blank")
bottom = min(im.height, box[3] + 24)
if bottom >= im.height - 2:
    print(f"warning: {png}: the page may be taller than the window; raise MAX_HEIGHT", file=sys.stderr)
# 256 colours keep text and flat figures sharp at a third of the size.
im.crop((0, 0, im.width, bottom)).quantize(colors=256, dither=Image.Dither.NONE).save(png, optimize=True)
print(f"{png}: {im.width}x{bottom}")
if extract:
    text = open(html, encoding="utf-8").read()
    for i, data in enumerate(re.findall(r'src="data:image/png;base64,([^"]+)"', text), start=1):
        with open(f"{stem}-fig{i}.png", "wb") as f:
            f.write(base64.b64decode(data))
PY
done
