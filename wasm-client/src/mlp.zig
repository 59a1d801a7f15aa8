//! propeller-fl multilayer-perceptron trainer (wasm32-wasi), trainer contract v2.
//!
//! Contract v2 (see ../README.md): the model and the dataset arrive on stdin as two
//! safetensors containers back to back (the model's tensors, then `x` [n, d] and `y` [n]);
//! the update leaves on stdout as one safetensors container (the model's tensors, same
//! names, dtypes and shapes) whose `__metadata__` carries num_samples and the metrics as
//! JSON. ROUND_ID, PROPLET_ID, MODEL_URI and HYPERPARAMS stay environment variables.
//! The exported function `propeller_contract_v2` tells the proplet which contract this is.
//!
//! The model: layers `l0`, `l1`, ... each a weight `l<i>.w` [in, out] and a bias
//! `l<i>.b` [out]; ReLU between layers, softmax cross-entropy over the last layer's `out`
//! classes. Mini-batch SGD with optional momentum and FedProx's mu, shuffled per epoch
//! exactly as the linear trainer (main.zig) does. f64 throughout; F32 tensors are widened
//! on the way in and narrowed on the way out.

const std = @import("std");
const builtin = @import("builtin");
const Allocator = std.mem.Allocator;
const Value = std.json.Value;

const exit_usage: u8 = 2;
const exit_bad_input: u8 = 1;

/// The marker the proplet looks for among the module's exports.
export fn propeller_contract_v2() void {}

const Task = enum { train, evaluate };

const Hyper = struct {
    epochs: u64 = 1,
    lr: f64 = 0.01,
    batch_size: u64 = 32,
    /// FedProx: mu/2 * ||theta - theta_global||^2 added to the loss (every tensor).
    mu: f64 = 0.0,
    /// Heavy-ball momentum: v = momentum * v + g; theta -= lr * v (v starts at 0).
    momentum: f64 = 0.0,
    shuffle: bool = true,
    task: Task = .train,
};

const Dtype = enum {
    F32,
    F64,

    fn size(self: Dtype) usize {
        return switch (self) {
            .F32 => 4,
            .F64 => 8,
        };
    }
};

/// One tensor of a container, widened to f64.
const Tensor = struct {
    name: []const u8,
    dtype: Dtype,
    shape: []const usize,
    data: []f64,
};

const Container = struct {
    tensors: []Tensor,
    /// Bytes of stdin this container took (header length, header, data).
    len: usize,

    fn get(self: Container, name: []const u8) ?*Tensor {
        for (self.tensors) |*t| {
            if (std.mem.eql(u8, t.name, name)) return t;
        }
        return null;
    }
};

const Layer = struct {
    in: usize,
    out: usize,
    w: []f64, // [in, out] row-major
    b: []f64, // [out]
};

const Metrics = struct {
    loss: f64,
    accuracy: f64,
};

const TrainMetrics = struct {
    loss: f64,
    accuracy: f64,
    loss_before: f64,
    accuracy_before: f64,
    epochs: u64,
};

const Dataset = struct {
    n: usize,
    d: usize,
    x: []const f64,
    y: []const usize,

    fn row(self: Dataset, i: usize) []const f64 {
        return self.x[i * self.d .. (i + 1) * self.d];
    }
};

// ---------------------------------------------------------------- diagnostics

fn die(code: u8, comptime fmt: []const u8, args: anytype) noreturn {
    std.debug.print("fl-mlp: " ++ fmt ++ "\n", args);
    std.process.exit(code);
}

fn nonEmpty(s: ?[]const u8) ?[]const u8 {
    const v = s orelse return null;
    if (std.mem.trim(u8, v, " \t\r\n").len == 0) return null;
    return v;
}

// ---------------------------------------------------------------- HYPERPARAMS

fn numberToF64(v: Value) ?f64 {
    const f: f64 = switch (v) {
        .integer => |i| @floatFromInt(i),
        .float => |x| x,
        .number_string => |s| std.fmt.parseFloat(f64, s) catch return null,
        else => return null,
    };
    if (!std.math.isFinite(f)) return null;
    return f;
}

fn numberToU64(v: Value) ?u64 {
    switch (v) {
        .integer => |i| return if (i >= 0) @intCast(i) else null,
        .float => |x| {
            if (!std.math.isFinite(x) or x < 0 or x != @floor(x) or x > 9007199254740992.0) return null;
            return @intFromFloat(x);
        },
        else => return null,
    }
}

fn parseHyper(alloc: Allocator, text: ?[]const u8) Hyper {
    var h: Hyper = .{};
    const src = nonEmpty(text) orelse return h;
    const parsed = std.json.parseFromSliceLeaky(Value, alloc, src, .{}) catch |err|
        die(exit_bad_input, "HYPERPARAMS is not valid JSON ({s})", .{@errorName(err)});
    const obj = switch (parsed) {
        .object => |o| o,
        else => die(exit_bad_input, "HYPERPARAMS must be a JSON object", .{}),
    };
    if (obj.get("epochs")) |v| {
        h.epochs = numberToU64(v) orelse die(exit_bad_input, "HYPERPARAMS.epochs must be a non-negative integer", .{});
    }
    if (obj.get("lr")) |v| {
        h.lr = numberToF64(v) orelse die(exit_bad_input, "HYPERPARAMS.lr must be a finite number", .{});
    }
    if (obj.get("batch_size")) |v| {
        h.batch_size = numberToU64(v) orelse die(exit_bad_input, "HYPERPARAMS.batch_size must be a positive integer", .{});
        if (h.batch_size == 0) die(exit_bad_input, "HYPERPARAMS.batch_size must be >= 1", .{});
    }
    if (obj.get("mu")) |v| {
        h.mu = numberToF64(v) orelse die(exit_bad_input, "HYPERPARAMS.mu must be a finite number >= 0", .{});
        if (h.mu < 0) die(exit_bad_input, "HYPERPARAMS.mu must be a finite number >= 0", .{});
    }
    if (obj.get("momentum")) |v| {
        h.momentum = numberToF64(v) orelse die(exit_bad_input, "HYPERPARAMS.momentum must be a number in [0, 1)", .{});
        if (h.momentum < 0 or h.momentum >= 1) die(exit_bad_input, "HYPERPARAMS.momentum must be a number in [0, 1)", .{});
    }
    if (obj.get("shuffle")) |v| {
        h.shuffle = switch (v) {
            .bool => |b| b,
            else => die(exit_bad_input, "HYPERPARAMS.shuffle must be true or false", .{}),
        };
    }
    if (obj.get("mode")) |v| {
        const ok = switch (v) {
            .string => |s| std.mem.eql(u8, s, "standard"),
            else => false,
        };
        // The literal mode is the linear trainer's replay of the seed's loop; an MLP has none.
        if (!ok) die(exit_bad_input, "HYPERPARAMS.mode must be \"standard\" (this trainer has no literal mode)", .{});
    }
    if (obj.get("task")) |v| {
        h.task = switch (v) {
            .string => |s| std.meta.stringToEnum(Task, s),
            else => null,
        } orelse die(exit_bad_input, "HYPERPARAMS.task must be \"train\" or \"evaluate\"", .{});
    }
    return h;
}

// ---------------------------------------------------------------- safetensors in

fn jsonUsize(v: Value) ?usize {
    return switch (v) {
        .integer => |i| if (i >= 0) @intCast(i) else null,
        else => null,
    };
}

/// One safetensors container at the start of `bytes`: u64 LE header length, JSON header
/// {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the data section.
fn parseContainer(alloc: Allocator, bytes: []const u8, what: []const u8) !Container {
    if (bytes.len < 8) die(exit_bad_input, "{s}: stdin ends before the safetensors header length", .{what});
    const header_len = std.mem.readInt(u64, bytes[0..8], .little);
    if (header_len > bytes.len - 8) die(exit_bad_input, "{s}: header length {d} exceeds the {d} bytes left on stdin", .{ what, header_len, bytes.len - 8 });
    const hl: usize = @intCast(header_len);
    const header = bytes[8 .. 8 + hl];
    const data = bytes[8 + hl ..];
    const parsed = std.json.parseFromSliceLeaky(Value, alloc, header, .{}) catch |err|
        die(exit_bad_input, "{s}: safetensors header is not valid JSON ({s})", .{ what, @errorName(err) });
    const obj = switch (parsed) {
        .object => |o| o,
        else => die(exit_bad_input, "{s}: safetensors header is not a JSON object", .{what}),
    };
    var tensors: std.ArrayList(Tensor) = .empty;
    var data_end: usize = 0;
    var it = obj.iterator();
    while (it.next()) |entry| {
        const name = entry.key_ptr.*;
        if (std.mem.eql(u8, name, "__metadata__")) continue;
        const info = switch (entry.value_ptr.*) {
            .object => |o| o,
            else => die(exit_bad_input, "{s}: tensor {s}: entry is not an object", .{ what, name }),
        };
        const dtype_name = switch (info.get("dtype") orelse die(exit_bad_input, "{s}: tensor {s}: no dtype", .{ what, name })) {
            .string => |s| s,
            else => die(exit_bad_input, "{s}: tensor {s}: dtype is not a string", .{ what, name }),
        };
        const dtype = std.meta.stringToEnum(Dtype, dtype_name) orelse
            die(exit_bad_input, "{s}: tensor {s}: dtype {s} is not F32 or F64", .{ what, name, dtype_name });
        const shape_v = switch (info.get("shape") orelse die(exit_bad_input, "{s}: tensor {s}: no shape", .{ what, name })) {
            .array => |a| a.items,
            else => die(exit_bad_input, "{s}: tensor {s}: shape is not an array", .{ what, name }),
        };
        const shape = try alloc.alloc(usize, shape_v.len);
        var count: usize = 1;
        for (shape_v, shape) |sv, *s| {
            s.* = jsonUsize(sv) orelse die(exit_bad_input, "{s}: tensor {s}: shape holds a non-integer", .{ what, name });
            count = std.math.mul(usize, count, s.*) catch die(exit_bad_input, "{s}: tensor {s}: shape too large", .{ what, name });
        }
        const offs = switch (info.get("data_offsets") orelse die(exit_bad_input, "{s}: tensor {s}: no data_offsets", .{ what, name })) {
            .array => |a| a.items,
            else => die(exit_bad_input, "{s}: tensor {s}: data_offsets is not an array", .{ what, name }),
        };
        if (offs.len != 2) die(exit_bad_input, "{s}: tensor {s}: data_offsets must be [begin, end]", .{ what, name });
        const begin = jsonUsize(offs[0]) orelse die(exit_bad_input, "{s}: tensor {s}: bad data_offsets", .{ what, name });
        const end = jsonUsize(offs[1]) orelse die(exit_bad_input, "{s}: tensor {s}: bad data_offsets", .{ what, name });
        const nbytes = std.math.mul(usize, count, dtype.size()) catch die(exit_bad_input, "{s}: tensor {s}: shape too large", .{ what, name });
        if (end < begin or end - begin != nbytes) die(exit_bad_input, "{s}: tensor {s}: data_offsets [{d}, {d}] do not hold {d} bytes", .{ what, name, begin, end, nbytes });
        if (end > data.len) die(exit_bad_input, "{s}: tensor {s}: data ends at {d}, past the {d} bytes on stdin", .{ what, name, end, data.len });
        data_end = @max(data_end, end);
        const values = try alloc.alloc(f64, count);
        const raw = data[begin..end];
        switch (dtype) {
            .F64 => for (values, 0..) |*v, i| {
                v.* = @bitCast(std.mem.readInt(u64, raw[i * 8 ..][0..8], .little));
            },
            .F32 => for (values, 0..) |*v, i| {
                const f: f32 = @bitCast(std.mem.readInt(u32, raw[i * 4 ..][0..4], .little));
                v.* = f;
            },
        }
        try tensors.append(alloc, .{ .name = name, .dtype = dtype, .shape = shape, .data = values });
    }
    return .{ .tensors = tensors.items, .len = 8 + hl + data_end };
}

fn layerName(buf: []u8, i: usize, suffix: []const u8) []const u8 {
    return std.fmt.bufPrint(buf, "l{d}.{s}", .{ i, suffix }) catch unreachable;
}

/// The layers `l0`, `l1`, ... of the model container, checked to chain from `d` inputs.
fn modelLayers(alloc: Allocator, model: Container, d: usize) ![]Layer {
    var layers: std.ArrayList(Layer) = .empty;
    var in = d;
    var buf: [32]u8 = undefined;
    while (true) {
        const i = layers.items.len;
        const w = model.get(layerName(&buf, i, "w")) orelse break;
        if (w.shape.len != 2) die(exit_bad_input, "model: tensor {s} must be 2-D [in, out]", .{w.name});
        if (w.shape[0] != in) die(exit_bad_input, "model: tensor {s} has {d} inputs, the layer below gives {d}", .{ w.name, w.shape[0], in });
        const b = model.get(layerName(&buf, i, "b")) orelse die(exit_bad_input, "model: layer l{d} has a weight but no l{d}.b", .{ i, i });
        if (b.shape.len != 1 or b.shape[0] != w.shape[1]) die(exit_bad_input, "model: tensor {s} must have shape [{d}]", .{ b.name, w.shape[1] });
        in = w.shape[1];
        try layers.append(alloc, .{ .in = w.shape[0], .out = w.shape[1], .w = w.data, .b = b.data });
    }
    if (layers.items.len == 0) die(exit_bad_input, "model: no tensor l0.w (layers are l0.w [in, out], l0.b [out], l1.w, ...)", .{});
    if (layers.items.len * 2 != model.tensors.len) die(exit_bad_input, "model: {d} tensors, but only l0..l{d} (.w and .b) are layers", .{ model.tensors.len, layers.items.len - 1 });
    if (in < 2) die(exit_bad_input, "model: the last layer has {d} outputs, a classifier needs >= 2", .{in});
    return layers.items;
}

fn parseDataset(alloc: Allocator, ds: Container, k: usize) !Dataset {
    const x = ds.get("x") orelse die(exit_bad_input, "dataset: no tensor x [n, d]", .{});
    const y = ds.get("y") orelse die(exit_bad_input, "dataset: no tensor y [n]", .{});
    if (x.shape.len != 2) die(exit_bad_input, "dataset: x must be 2-D [n, d]", .{});
    if (y.shape.len != 1 or y.shape[0] != x.shape[0]) die(exit_bad_input, "dataset: y must have shape [{d}]", .{x.shape[0]});
    const n = x.shape[0];
    if (n == 0) die(exit_bad_input, "dataset: no samples: nothing to train on", .{});
    for (x.data, 0..) |v, i| {
        if (!std.math.isFinite(v)) die(exit_bad_input, "dataset: x[{d}][{d}] is not finite", .{ i / x.shape[1], i % x.shape[1] });
    }
    const labels = try alloc.alloc(usize, n);
    for (y.data, labels, 0..) |v, *l, i| {
        if (!(v >= 0 and v < @as(f64, @floatFromInt(k)) and v == @floor(v)))
            die(exit_bad_input, "dataset: y[{d}] = {d} is not a class in 0..{d}", .{ i, v, k - 1 });
        l.* = @intFromFloat(v);
    }
    return .{ .n = n, .d = x.shape[1], .x = x.data, .y = labels };
}

// ---------------------------------------------------------------- the network

/// Samples run through the network together: each weight is read once per chunk rather
/// than once per sample, and the batch's gradient sums stay in registers.
const chunk = 32;

const lanes = 2;
const V = @Vector(lanes, f64);
/// Vectors per register block.
const nvec = 4;
/// Columns per register block: 8, four accumulators of one 128-bit register each (simd128;
/// SSE2 natively).
const block = nvec * lanes;

inline fn load(s: []const f64, at: usize) V {
    return s[at..][0..lanes].*;
}

inline fn store(s: []f64, at: usize, v: V) void {
    s[at..][0..lanes].* = v;
}

/// Terms of a sum per group: the kernels skip a group whose inputs are all zero (ReLU
/// zeros, blank pixels) with one test.
const unroll = 4;

/// On wasm, a test between two terms of a group that never stops the sum (see
/// forwardGroup). Cranelift emits a basic block's loads first, in order, and its arithmetic
/// where the block's end needs it, so a group of four terms kept its 16 loaded vectors and
/// the 8 accumulators live at once and spilled; a block per term keeps 4 loads live. LLVM
/// schedules the native build itself, where the tests only cost (measured:
/// docs/benchmarks.md, the wasm-mlp item).
const term_blocks = builtin.cpu.arch.isWasm();

/// Groups per loop iteration on wasm (32 terms). Under wasmtime every loop header holds the
/// epoch check and the fuel check, each with an out-of-line call that clobbers every vector
/// register, so Cranelift keeps values live across a loop header (the accumulators) on the
/// stack and reloads them in each iteration: more terms per iteration make that rarer.
/// Natively one group (LLVM keeps the accumulators in registers; 8 made it 1-4 % slower).
const groups = if (term_blocks) 8 else 1;

/// Rows a register block advances together: samples in forwardLayer, weight rows in
/// gradLayer. Each weight (or dz) vector loaded is used for `rows` accumulators, and one
/// loop iteration (one epoch check under wasmtime) does `rows` times the arithmetic. Two
/// rows of four accumulators, their splats and the loaded vector fit x86-64's 16 vector
/// registers; three and four rows made the module no faster (measured: docs/benchmarks.md;
/// eight terms per iteration were slower then, before the terms had blocks of their own).
const rows = 2;

inline fn allZeroV(comptime p: usize, comptime h: usize, xv: [p][h]V) bool {
    // One test, not one per vector: the bits of all the values or-ed together, sign bits
    // masked (-0.0 is zero; NaN is not). Every test is a branch, and under wasmtime a basic
    // block of its own (fuel is counted per block).
    const U = @Vector(lanes, u64);
    var bits: U = @splat(0);
    inline for (0..p) |u| {
        inline for (0..h) |k| bits |= @as(U, @bitCast(xv[u][k]));
    }
    const magnitude: U = @splat(0x7fff_ffff_ffff_ffff);
    return @reduce(.Or, bits & magnitude) == 0;
}

inline fn allZero(comptime p: usize, xs: [p][unroll]f64) bool {
    var zero = true;
    inline for (0..p) |u| zero = zero and @reduce(.And, @as(@Vector(unroll, f64), xs[u]) == @as(@Vector(unroll, f64), @splat(0)));
    return zero;
}

/// Adds the terms r .. r + unroll of the rows s .. s + p into acc, unless their inputs are
/// all zero. False if it stopped at `lim`, which it never does when lim = l.in (the caller
/// passes it so on wasm; `lim` is opaque to LLVM, so the test stays and ends a basic block
/// after every term: see term_blocks).
inline fn forwardGroup(comptime p: usize, comptime nv: usize, a: []const f64, s: usize, l: Layer, j: usize, r: usize, acc: *[p][nv]V, lim: usize) bool {
    const in = l.in;
    const out = l.out;
    // The rows' next four inputs as vectors (fewer live registers than eight scalars:
    // wasmtime's compiler spilled accumulators with the scalars).
    var xv: [p][unroll / lanes]V = undefined;
    inline for (0..p) |u| {
        inline for (0..unroll / lanes) |h| xv[u][h] = load(a, (s + u) * in + r + h * lanes);
    }
    // Four ReLU zeros (or zero pixels) in every row add nothing.
    if (allZeroV(p, unroll / lanes, xv)) return true;
    inline for (0..unroll) |t| {
        if (term_blocks and t > 0 and r + t >= lim) return false;
        inline for (0..nv) |q| {
            const wv = load(l.w, (r + t) * out + j + q * lanes);
            inline for (0..p) |u| acc[u][q] += @as(V, @splat(xv[u][t / lanes][t % lanes])) * wv;
        }
    }
    return true;
}

/// z[s + u, j ..][0 .. nv * lanes] for u < p: the bias plus the sum over r, in order, of
/// a[s + u, r] * w[r, j ..]. Every output's terms are added in the same order whatever p
/// and nv, so the blocking does not change the results.
inline fn forwardBlock(comptime p: usize, comptime nv: usize, a: []const f64, s: usize, l: Layer, j: usize, z: []f64) void {
    @setEvalBranchQuota(10_000);
    const in = l.in;
    const out = l.out;
    const span = unroll * groups;
    const in_g = in - in % span;
    const in4 = in - in % unroll;
    // Equal to `in` at run time; read through a volatile pointer so LLVM cannot prove the
    // groups' tests false and drop them.
    const lim = if (term_blocks) @as(*const volatile usize, &l.in).* else in;
    var acc: [p][nv]V = undefined;
    inline for (0..p) |u| {
        inline for (0..nv) |q| acc[u][q] = load(l.b, j + q * lanes);
    }
    var r: usize = 0;
    outer: while (r < in_g) : (r += span) {
        inline for (0..groups) |gi| {
            if (!forwardGroup(p, nv, a, s, l, j, r + gi * unroll, &acc, lim)) break :outer;
        }
    }
    while (r < in4) : (r += unroll) _ = forwardGroup(p, nv, a, s, l, j, r, &acc, lim);
    while (r < in) : (r += 1) {
        inline for (0..nv) |q| {
            const wv = load(l.w, r * out + j + q * lanes);
            inline for (0..p) |u| acc[u][q] += @as(V, @splat(a[(s + u) * in + r])) * wv;
        }
    }
    inline for (0..p) |u| {
        inline for (0..nv) |q| store(z, (s + u) * out + j + q * lanes, acc[u][q]);
    }
}

/// forwardBlock over the m rows of `a`, `rows` at a time.
inline fn forwardColumns(comptime nv: usize, a: []const f64, m: usize, l: Layer, j: usize, z: []f64) void {
    var s: usize = 0;
    while (s + rows <= m) : (s += rows) forwardBlock(rows, nv, a, s, l, j, z);
    while (s < m) : (s += 1) forwardBlock(1, nv, a, s, l, j, z);
}

/// z[s, :] = b + a[s, :] · w for the m rows of `a` ([m, in], row-major; w is [in, out]).
/// Not inlined (nor gradLayer): as functions of their own their loops keep the accumulators
/// in registers under wasmtime's compiler, which spills them inside a large `main`.
noinline fn forwardLayer(a: []const f64, m: usize, l: Layer, z: []f64) void {
    const in = l.in;
    const out = l.out;
    var j: usize = 0;
    while (j + block <= out) : (j += block) forwardColumns(nvec, a, m, l, j, z);
    // Columns left over in vectors of their own (a 10-class layer: 8 + 2), then one by one.
    while (j + lanes <= out) : (j += lanes) forwardColumns(1, a, m, l, j, z);
    while (j < out) : (j += 1) {
        for (0..m) |s| {
            var acc = l.b[j];
            for (a[s * in .. (s + 1) * in], 0..) |av, r| acc += av * l.w[r * out + j];
            z[s * out + j] = acc;
        }
    }
}

/// Adds the terms s .. s + unroll (samples) of the weight rows r .. r + p into acc, unless
/// their inputs are all zero; false if it stopped at `lim` (as forwardGroup: never, with
/// lim = m).
inline fn gradGroup(comptime p: usize, comptime nv: usize, a: []const f64, dz: []const f64, g: Layer, r: usize, j: usize, s: usize, acc: *[p][nv]V, lim: usize) bool {
    const in = g.in;
    const out = g.out;
    if (p == lanes) {
        // The two rows' values of each sample as one vector.
        var xv: [unroll][1]V = undefined;
        inline for (0..unroll) |t| xv[t][0] = load(a, (s + t) * in + r);
        if (allZeroV(unroll, 1, xv)) return true;
        inline for (0..unroll) |t| {
            if (term_blocks and t > 0 and s + t >= lim) return false;
            inline for (0..nv) |q| {
                const dv = load(dz, (s + t) * out + j + q * lanes);
                inline for (0..p) |u| acc[u][q] += @as(V, @splat(xv[t][0][u])) * dv;
            }
        }
    } else {
        var xs: [p][unroll]f64 = undefined;
        inline for (0..p) |u| {
            inline for (0..unroll) |t| xs[u][t] = a[(s + t) * in + r + u];
        }
        if (allZero(p, xs)) return true;
        inline for (0..unroll) |t| {
            if (term_blocks and t > 0 and s + t >= lim) return false;
            inline for (0..nv) |q| {
                const dv = load(dz, (s + t) * out + j + q * lanes);
                inline for (0..p) |u| acc[u][q] += @as(V, @splat(xs[u][t])) * dv;
            }
        }
    }
    return true;
}

/// g.w[r + u, j ..][0 .. nv * lanes] += the sum over s, in order, of a[s, r + u] * dz[s, j ..]
/// for u < p. As in forwardBlock, the order of the terms does not depend on p or nv.
inline fn gradBlock(comptime p: usize, comptime nv: usize, a: []const f64, m: usize, dz: []const f64, g: Layer, r: usize, j: usize) void {
    @setEvalBranchQuota(10_000);
    const out = g.out;
    const in = g.in;
    const span = unroll * groups;
    const m_g = m - m % span;
    const m4 = m - m % unroll;
    const lim = if (term_blocks) @as(*const volatile usize, &m).* else m;
    var acc: [p][nv]V = undefined;
    inline for (0..p) |u| {
        inline for (0..nv) |q| acc[u][q] = load(g.w, (r + u) * out + j + q * lanes);
    }
    var s: usize = 0;
    outer: while (s < m_g) : (s += span) {
        inline for (0..groups) |gi| {
            if (!gradGroup(p, nv, a, dz, g, r, j, s + gi * unroll, &acc, lim)) break :outer;
        }
    }
    while (s < m4) : (s += unroll) _ = gradGroup(p, nv, a, dz, g, r, j, s, &acc, lim);
    while (s < m) : (s += 1) {
        inline for (0..nv) |q| {
            const dv = load(dz, s * out + j + q * lanes);
            inline for (0..p) |u| acc[u][q] += @as(V, @splat(a[s * in + r + u])) * dv;
        }
    }
    inline for (0..p) |u| {
        inline for (0..nv) |q| store(g.w, (r + u) * out + j + q * lanes, acc[u][q]);
    }
}

/// The gradient of the weight rows r .. r + p, all columns.
inline fn gradRows(comptime p: usize, a: []const f64, m: usize, dz: []const f64, g: Layer, r: usize) void {
    const in = g.in;
    const out = g.out;
    var j: usize = 0;
    while (j + block <= out) : (j += block) gradBlock(p, nvec, a, m, dz, g, r, j);
    while (j + lanes <= out) : (j += lanes) gradBlock(p, 1, a, m, dz, g, r, j);
    while (j < out) : (j += 1) {
        inline for (0..p) |u| {
            var acc = g.w[(r + u) * out + j];
            for (0..m) |s| acc += a[s * in + r + u] * dz[s * out + j];
            g.w[(r + u) * out + j] = acc;
        }
    }
}

/// g.w += a^T · dz and g.b += column sums of dz, over the m rows.
noinline fn gradLayer(a: []const f64, m: usize, dz: []const f64, g: Layer) void {
    const in = g.in;
    const out = g.out;
    var r: usize = 0;
    while (r + rows <= in) : (r += rows) gradRows(rows, a, m, dz, g, r);
    while (r < in) : (r += 1) gradRows(1, a, m, dz, g, r);
    for (0..m) |s| {
        for (g.b, dz[s * out .. (s + 1) * out]) |*gb, d| gb.* += d;
    }
}

/// below[s, :] = (w · dz[s, :]) where z_below[s, :] > 0, else 0 (back through the ReLU);
/// `wt` is w transposed ([out, in], zero bias), so this is a forward product over it.
fn backLayer(dz: []const f64, m: usize, wt: Layer, z_below: []const f64, below: []f64) void {
    forwardLayer(dz, m, wt, below);
    reluMask(below[0 .. m * wt.out], z_below[0 .. m * wt.out]);
}

/// Elements per iteration of the elementwise loops (ReLU, its mask, the SGD step): four
/// vectors, so one loop back-edge (an epoch check under wasmtime) per eight elements.
const ew = nvec * lanes;

/// a = ReLU(z): z where z > 0, else 0 (NaN included), without a branch. Kept out of `main`
/// (noinline) like the products: inside it wasmtime's compiler keeps the memory's base
/// address on the stack and reloads it for every access.
noinline fn relu(z: []const f64, a: []f64) void {
    const zero: V = @splat(0);
    var i: usize = 0;
    while (i + ew <= z.len) : (i += ew) {
        inline for (0..nvec) |q| {
            const v = load(z, i + q * lanes);
            store(a, i + q * lanes, @select(f64, v > zero, v, zero));
        }
    }
    while (i < z.len) : (i += 1) a[i] = if (z[i] > 0) z[i] else 0;
}

/// d = 0 where z is not > 0 (back through the ReLU), without a branch.
noinline fn reluMask(d: []f64, z: []const f64) void {
    const zero: V = @splat(0);
    var i: usize = 0;
    while (i + ew <= d.len) : (i += ew) {
        inline for (0..nvec) |q| {
            const at = i + q * lanes;
            store(d, at, @select(f64, load(z, at) > zero, load(d, at), zero));
        }
    }
    while (i < d.len) : (i += 1) {
        if (!(z[i] > 0)) d[i] = 0;
    }
}

const Net = struct {
    layers: []Layer,
    /// The chunk's inputs [chunk, d], and per layer its pre-activations z, activations
    /// (ReLU(z); softmax probabilities for the last) and d loss / d z, each [chunk, out].
    x: []f64,
    z: [][]f64,
    a: [][]f64,
    dz: [][]f64,
    /// Per layer its weight transposed ([out, in]) with a zero bias, for the backward pass.
    wt: []Layer,

    fn init(alloc: Allocator, layers: []Layer) !Net {
        const z = try alloc.alloc([]f64, layers.len);
        const a = try alloc.alloc([]f64, layers.len);
        const dz = try alloc.alloc([]f64, layers.len);
        for (layers, 0..) |l, i| {
            z[i] = try alloc.alloc(f64, chunk * l.out);
            a[i] = try alloc.alloc(f64, chunk * l.out);
            dz[i] = try alloc.alloc(f64, chunk * l.out);
        }
        const x = try alloc.alloc(f64, chunk * layers[0].in);
        const wt = try alloc.alloc(Layer, layers.len);
        for (layers, wt, 0..) |l, *t, i| {
            // Layer 0 has nothing below it to propagate to.
            if (i == 0) {
                t.* = .{ .in = l.out, .out = l.in, .w = &.{}, .b = &.{} };
                continue;
            }
            const zeros = try alloc.alloc(f64, l.in);
            @memset(zeros, 0);
            t.* = .{ .in = l.out, .out = l.in, .w = try alloc.alloc(f64, l.w.len), .b = zeros };
        }
        return .{ .layers = layers, .x = x, .z = z, .a = a, .dz = dz, .wt = wt };
    }

    /// Refresh `wt` from the weights (once per batch: the weights change after each).
    fn transpose(self: Net) void {
        for (self.layers[1..], self.wt[1..]) |l, t| {
            for (0..l.in) |r| {
                for (0..l.out) |j| t.w[j * l.in + r] = l.w[r * l.out + j];
            }
        }
    }

    fn input(self: Net, i: usize) []const f64 {
        return if (i == 0) self.x else self.a[i - 1];
    }

    /// Forward pass of the samples `idx` (at most `chunk`); adds their losses into `loss`
    /// and their correct predictions into `correct`. a[last] holds the probabilities.
    fn forward(self: Net, ds: Dataset, idx: []const usize, loss: *f64, correct: *usize) void {
        const m = idx.len;
        const d = ds.d;
        for (idx, 0..) |i, s| @memcpy(self.x[s * d .. (s + 1) * d], ds.row(i));
        const last = self.layers.len - 1;
        for (self.layers, 0..) |l, i| {
            forwardLayer(self.input(i), m, l, self.z[i]);
            if (i < last) {
                relu(self.z[i][0 .. m * l.out], self.a[i][0 .. m * l.out]);
            }
        }
        const k = self.layers[last].out;
        for (idx, 0..) |i, s| {
            const z = self.z[last][s * k .. (s + 1) * k];
            const p = self.a[last][s * k .. (s + 1) * k];
            var zmax = z[0];
            var best: usize = 0;
            for (z, 0..) |v, j| {
                if (v > zmax) {
                    zmax = v;
                    best = j;
                }
            }
            var sum: f64 = 0;
            for (p, z) |*pj, zj| {
                pj.* = @exp(zj - zmax);
                sum += pj.*;
            }
            for (p) |*pj| pj.* /= sum;
            loss.* += @log(sum) - (z[ds.y[i]] - zmax);
            if (best == ds.y[i]) correct.* += 1;
        }
    }

    /// Backward pass of the samples last run forward: adds d loss / d theta into `grads`.
    fn backward(self: Net, ds: Dataset, idx: []const usize, grads: []Layer) void {
        const m = idx.len;
        const last = self.layers.len - 1;
        const k = self.layers[last].out;
        @memcpy(self.dz[last][0 .. m * k], self.a[last][0 .. m * k]);
        for (idx, 0..) |i, s| self.dz[last][s * k + ds.y[i]] -= 1;
        var i: usize = last + 1;
        while (i > 0) {
            i -= 1;
            gradLayer(self.input(i), m, self.dz[i], grads[i]);
            if (i == 0) break;
            backLayer(self.dz[i], m, self.wt[i], self.z[i - 1], self.dz[i - 1]);
        }
    }
};

fn evaluate(net: Net, ds: Dataset, order: []usize) Metrics {
    for (order, 0..) |*o, i| o.* = i;
    var loss: f64 = 0;
    var correct: usize = 0;
    var start: usize = 0;
    while (start < ds.n) : (start += chunk) {
        net.forward(ds, order[start..@min(start + chunk, ds.n)], &loss, &correct);
    }
    const n: f64 = @floatFromInt(ds.n);
    return .{ .loss = loss / n, .accuracy = @as(f64, @floatFromInt(correct)) / n };
}

// ---------------------------------------------------------------- shuffling: shuffle.zig

const shuffling = @import("shuffle.zig");
const epochSeed = shuffling.epochSeed;
const shuffle = shuffling.shuffle;

// ---------------------------------------------------------------- training

fn zeroLike(alloc: Allocator, layers: []const Layer) ![]Layer {
    const out = try alloc.alloc(Layer, layers.len);
    for (layers, out) |l, *o| {
        o.* = .{ .in = l.in, .out = l.out, .w = try alloc.alloc(f64, l.w.len), .b = try alloc.alloc(f64, l.b.len) };
        @memset(o.w, 0);
        @memset(o.b, 0);
    }
    return out;
}

/// theta -= lr * step, with step = g / m + mu * (theta - theta_global), through momentum;
/// a vector at a time (the same operations in the same order per element as one at a time).
noinline fn applyStep(theta: []f64, g: []const f64, global: []const f64, v: []f64, h: Hyper, m: f64) void {
    const lr: V = @splat(h.lr);
    const mv: V = @splat(m);
    const mu: V = @splat(h.mu);
    const momentum: V = @splat(h.momentum);
    var i: usize = 0;
    while (i + ew <= theta.len) : (i += ew) {
        inline for (0..nvec) |q| {
            const at = i + q * lanes;
            const t = load(theta, at);
            var step = load(g, at) / mv;
            if (h.mu != 0) step += mu * (t - load(global, at));
            if (h.momentum != 0) {
                const vj = momentum * load(v, at) + step;
                store(v, at, vj);
                step = vj;
            }
            store(theta, at, t - lr * step);
        }
    }
    while (i < theta.len) : (i += 1) {
        var step = g[i] / m;
        if (h.mu != 0) step += h.mu * (theta[i] - global[i]);
        if (h.momentum != 0) {
            v[i] = h.momentum * v[i] + step;
            step = v[i];
        }
        theta[i] -= h.lr * step;
    }
}

fn train(net: Net, ds: Dataset, h: Hyper, order: []usize, round_id: []const u8, proplet_id: []const u8, alloc: Allocator) !void {
    const layers = net.layers;
    const grads = try zeroLike(alloc, layers);
    const velocity = try zeroLike(alloc, layers);
    // The model as received: the centre of FedProx's proximal term.
    const global = try zeroLike(alloc, layers);
    for (layers, global) |l, *g| {
        @memcpy(g.w, l.w);
        @memcpy(g.b, l.b);
    }
    const bs: usize = @intCast(@min(h.batch_size, ds.n));
    var epoch: u64 = 0;
    while (epoch < h.epochs) : (epoch += 1) {
        if (h.shuffle) {
            shuffle(order, epochSeed(round_id, proplet_id, epoch));
        } else {
            for (order, 0..) |*o, i| o.* = i;
        }
        var start: usize = 0;
        while (start < ds.n) : (start += bs) {
            const end = @min(start + bs, ds.n);
            for (grads) |g| {
                @memset(g.w, 0);
                @memset(g.b, 0);
            }
            net.transpose();
            var sub = start;
            while (sub < end) : (sub += chunk) {
                const idx = order[sub..@min(sub + chunk, end)];
                var loss: f64 = 0;
                var correct: usize = 0;
                net.forward(ds, idx, &loss, &correct);
                net.backward(ds, idx, grads);
            }
            const m: f64 = @floatFromInt(end - start);
            for (layers, grads, global, velocity) |l, g, c, v| {
                applyStep(l.w, g.w, c.w, v.w, h, m);
                applyStep(l.b, g.b, c.b, v.b, h, m);
            }
        }
    }
}

// ---------------------------------------------------------------- safetensors out

fn writeMetadata(s: *std.json.Stringify, key: []const u8, value: []const u8) !void {
    try s.objectField(key);
    try s.write(value);
}

fn writeOutput(
    alloc: Allocator,
    w: *std.Io.Writer,
    model: Container,
    metadata: []const [2][]const u8,
) !void {
    var header: std.Io.Writer.Allocating = .init(alloc);
    var s: std.json.Stringify = .{ .writer = &header.writer };
    try s.beginObject();
    try s.objectField("__metadata__");
    try s.beginObject();
    for (metadata) |kv| try writeMetadata(&s, kv[0], kv[1]);
    try s.endObject();
    var offset: usize = 0;
    for (model.tensors) |t| {
        const nbytes = t.data.len * t.dtype.size();
        try s.objectField(t.name);
        try s.beginObject();
        try s.objectField("dtype");
        try s.write(@tagName(t.dtype));
        try s.objectField("shape");
        try s.write(t.shape);
        try s.objectField("data_offsets");
        try s.write([2]usize{ offset, offset + nbytes });
        try s.endObject();
        offset += nbytes;
    }
    try s.endObject();
    // Pad the header with spaces so the data starts 8-byte aligned (as safetensors does).
    while ((header.written().len) % 8 != 0) try header.writer.writeByte(' ');
    const text = header.written();
    try w.writeInt(u64, text.len, .little);
    try w.writeAll(text);
    for (model.tensors) |t| {
        switch (t.dtype) {
            .F64 => for (t.data) |v| try w.writeInt(u64, @bitCast(v), .little),
            .F32 => for (t.data) |v| {
                const f: f32 = @floatCast(v);
                try w.writeInt(u32, @bitCast(f), .little);
            },
        }
    }
}

// ---------------------------------------------------------------- entry point

pub fn main(init: std.process.Init) !void {
    const alloc = init.arena.allocator();
    const env = init.environ_map;

    const round_id = nonEmpty(env.get("ROUND_ID")) orelse
        die(exit_usage, "ROUND_ID environment variable is required", .{});
    const model_uri = env.get("MODEL_URI") orelse "";
    const proplet_id = env.get("PROPLET_ID") orelse "";
    const hyper = parseHyper(alloc, env.get("HYPERPARAMS"));

    var in_buf: [1 << 16]u8 = undefined;
    var fr = std.Io.File.stdin().readerStreaming(init.io, &in_buf);
    const stdin = fr.interface.allocRemaining(alloc, .unlimited) catch |err|
        die(exit_bad_input, "cannot read stdin ({s})", .{@errorName(err)});

    const model = try parseContainer(alloc, stdin, "model");
    const ds_container = try parseContainer(alloc, stdin[model.len..], "dataset");
    const x = ds_container.get("x") orelse die(exit_bad_input, "dataset: no tensor x [n, d]", .{});
    if (x.shape.len != 2) die(exit_bad_input, "dataset: x must be 2-D [n, d]", .{});
    const layers = try modelLayers(alloc, model, x.shape[1]);
    const k = layers[layers.len - 1].out;
    const ds = try parseDataset(alloc, ds_container, k);
    const net = try Net.init(alloc, layers);

    var out_buf: [1 << 16]u8 = undefined;
    var fw = std.Io.File.stdout().writerStreaming(init.io, &out_buf);
    const w = &fw.interface;

    var num_buf: [24]u8 = undefined;
    const num_samples = std.fmt.bufPrint(&num_buf, "{d}", .{ds.n}) catch unreachable;
    const order = try alloc.alloc(usize, ds.n);
    const before = evaluate(net, ds, order);
    if (hyper.task == .evaluate) {
        const metrics = try std.json.Stringify.valueAlloc(alloc, before, .{});
        std.debug.print("fl-mlp: evaluate round={s} proplet={s} n={d} loss {d:.6} accuracy {d:.6}\n", .{ round_id, proplet_id, ds.n, before.loss, before.accuracy });
        const empty: Container = .{ .tensors = &.{}, .len = 0 };
        try writeOutput(alloc, w, empty, &.{ .{ "num_samples", num_samples }, .{ "metrics", metrics } });
        try w.flush();
        return;
    }
    try train(net, ds, hyper, order, round_id, proplet_id, alloc);
    for (layers, 0..) |l, i| {
        for (l.w) |v| if (!std.math.isFinite(v)) die(exit_bad_input, "training diverged (non-finite weight in l{d}.w); lower lr", .{i});
        for (l.b) |v| if (!std.math.isFinite(v)) die(exit_bad_input, "training diverged (non-finite bias in l{d}.b); lower lr", .{i});
    }
    const after = evaluate(net, ds, order);
    std.debug.print("fl-mlp: round={s} proplet={s} n={d} d={d} k={d} layers={d} epochs={d} lr={d} batch_size={d} mu={d} momentum={d} loss {d:.6} -> {d:.6}\n", .{
        round_id, proplet_id, ds.n, ds.d, k, layers.len, hyper.epochs, hyper.lr, hyper.batch_size, hyper.mu, hyper.momentum, before.loss, after.loss,
    });
    const metrics = try std.json.Stringify.valueAlloc(alloc, TrainMetrics{
        .loss = after.loss,
        .accuracy = after.accuracy,
        .loss_before = before.loss,
        .accuracy_before = before.accuracy,
        .epochs = hyper.epochs,
    }, .{});
    try writeOutput(alloc, w, model, &.{
        .{ "round_id", round_id },
        .{ "proplet_id", proplet_id },
        .{ "base_model_uri", model_uri },
        .{ "num_samples", num_samples },
        .{ "metrics", metrics },
    });
    try w.flush();
}
