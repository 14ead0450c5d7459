// Pictures for people, never for the certificate: decoding an input for display, and noise
// drawn in the browser with a seeded generator so that the same job always shows the same
// illustration. Nothing here is sent to the API: the service draws its own noise.

/** mulberry32: a small seeded 32-bit generator, uniform in [0, 1). */
export function generator(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Standard normal draws (Box–Muller). */
export function normals(count, random) {
  const out = new Float64Array(count);
  for (let i = 0; i < count; i += 2) {
    const u = 1 - random(); // (0, 1]: log(u) is finite
    const v = random();
    const r = Math.sqrt(-2 * Math.log(u));
    out[i] = r * Math.cos(2 * Math.PI * v);
    if (i + 1 < count) out[i + 1] = r * Math.sin(2 * Math.PI * v);
  }
  return out;
}

/** x + σ·ε, ε ~ N(0, I): one noisy copy as the smoothed classifier sees it (not clipped). */
export function noisy(pixels, sigma, random) {
  const eps = normals(pixels.length, random);
  return pixels.map((p, i) => p + sigma * eps[i]);
}

/** x + δ with ‖δ‖₂ = radius in a random direction: a change the certificate covers. */
export function shifted(pixels, radius, random) {
  const eps = normals(pixels.length, random);
  let norm = 0;
  for (const e of eps) norm += e * e;
  norm = Math.sqrt(norm) || 1;
  return pixels.map((p, i) => p + (radius * eps[i]) / norm);
}

/** Draw [C, H, W] values (C = 1 or 3) on `canvas`, clipped to [0, 1] for display, scaled up
 * without smoothing so that pixels stay visible. */
export function draw(canvas, pixels, [channels, height, width], size = 112) {
  const plane = height * width;
  const image = new ImageData(width, height);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const value = pixels[(channels === 3 ? c : 0) * plane + i];
      image.data[4 * i + c] = Math.round(255 * Math.min(1, Math.max(0, value)));
    }
    image.data[4 * i + 3] = 255;
  }
  const source = document.createElement("canvas");
  source.width = width;
  source.height = height;
  source.getContext("2d").putImageData(image, 0, 0);
  const scale = size / Math.max(width, height);
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = scale < 1;
  context.drawImage(source, 0, 0, canvas.width, canvas.height);
}

const NPY_TYPES = { "|u1": Uint8Array, "<u1": Uint8Array, "<f4": Float32Array, "<f8": Float64Array };

/** An .npy's values in [0, 1] (uint8 divided by 255) and its shape [C, H, W], or null for a
 * layout this preview does not read (the API still may). */
function readNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 10 || bytes[0] !== 0x93 || String.fromCharCode(...bytes.slice(1, 6)) !== "NUMPY") return null;
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.slice(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || fortran[1] === "True" || !shape || !(descr[1] in NPY_TYPES)) return null;
  const dims = shape[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (dims.length === 2) dims.unshift(1);
  if (dims.length !== 3) return null;
  const Type = NPY_TYPES[descr[1]];
  const offset = start + headerLength;
  const count = dims[0] * dims[1] * dims[2];
  if (offset % Type.BYTES_PER_ELEMENT !== 0 || buffer.byteLength < offset + count * Type.BYTES_PER_ELEMENT) return null;
  const raw = new Type(buffer, offset, count);
  const values = Float64Array.from(raw, (v) => (Type === Uint8Array ? v / 255 : v));
  return { pixels: values, shape: dims };
}

/** A PNG, JPEG or .npy file as [C, H, W] values in [0, 1], with `channels` channels (1: the
 * luminance PIL's "L" conversion computes; 3: RGB), or null when it cannot be previewed. */
export async function decode(blob, channels) {
  if (/\.npy$/i.test(blob.name || "") || blob.type === "application/octet-stream") {
    return readNpy(await blob.arrayBuffer());
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    return null;
  }
  const { width, height } = bitmap;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const data = context.getImageData(0, 0, width, height).data;
  const plane = width * height;
  const c = channels === 3 ? 3 : 1;
  const pixels = new Float64Array(c * plane);
  for (let i = 0; i < plane; i++) {
    const [r, g, b] = [data[4 * i], data[4 * i + 1], data[4 * i + 2]];
    if (c === 1) pixels[i] = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) / 255; // PIL's "L"
    else for (let k = 0; k < 3; k++) pixels[k * plane + i] = [r, g, b][k] / 255;
  }
  return { pixels, shape: [c, height, width] };
}
