//! propeller-fl training client (wasm32-wasi).
//!
//! Contract (see ../README.md): every input arrives in an environment variable,
//! exactly one JSON object is written to stdout, diagnostics go to stderr.
//!
//!   ROUND_ID      required (missing/empty -> exit 2)
//!   MODEL_URI     echoed back as base_model_uri
//!   HYPERPARAMS   {"epochs": int=1, "lr": float=0.01, "batch_size": int=1,
//!                  "mu": float=0 (FedProx), "shuffle": bool=true,
//!                  "mode": "standard"|"literal", "task": "train"|"evaluate"}
//!   PROPLET_ID    echoed back; part of the shuffle seed
//!   MODEL_DATA    {"w": [f64...], "b": f64}
//!   DATASET_DATA  {"data": [{"x": [f64...], "y": 0|1}], ...}
//!
//! Training is logistic regression with per-epoch Fisher-Yates shuffling driven
//! by SplitMix64 seeded with FNV-1a 64 of
//!   ROUND_ID ++ 0x00 ++ PROPLET_ID ++ 0x00 ++ epoch (u64, little endian),
//! so identical inputs always give an identical update. "shuffle": false keeps the
//! data order; "mode": "literal" is the original demo's algorithm (data order, one SGD
//! step per example whatever batch_size says); "task": "evaluate" trains nothing and
//! reports the received model's loss and accuracy on the data.

const std = @import("std");
const Allocator = std.mem.Allocator;
const Value = std.json.Value;

const exit_usage: u8 = 2;
const exit_bad_input: u8 = 1;

const z_clamp: f64 = 20.0;
const p_eps: f64 = 1e-12;

const Mode = enum { standard, literal };
const Task = enum { train, evaluate };

const Hyper = struct {
    epochs: u64 = 1,
    lr: f64 = 0.01,
    batch_size: u64 = 1,
    /// FedProx: mu/2 * ||theta - theta_global||^2 added to the loss (w and b).
    mu: f64 = 0.0,
    shuffle: bool = true,
    mode: Mode = .standard,
    task: Task = .train,
};

const Model = struct {
    w: []f64,
    b: f64,
};

/// Row-major feature matrix (n x d) plus labels.
const Dataset = struct {
    n: usize,
    d: usize,
    x: []f64,
    y: []f64,

    fn row(self: Dataset, i: usize) []const f64 {
        return self.x[i * self.d .. (i + 1) * self.d];
    }
};

const Metrics = struct {
    loss: f64,
    accuracy: f64,
};

const EvalOutput = struct {
    num_samples: usize,
    metrics: Metrics,
};

const Output = struct {
    round_id: []const u8,
    proplet_id: []const u8,
    base_model_uri: []const u8,
    num_samples: usize,
    metrics: struct {
        loss: f64,
        accuracy: f64,
        loss_before: f64,
        accuracy_before: f64,
        epochs: u64,
    },
    update: struct {
        w: []const f64,
        b: f64,
    },
};

// ---------------------------------------------------------------- diagnostics

fn die(code: u8, comptime fmt: []const u8, args: anytype) noreturn {
    std.debug.print("fl-client: " ++ fmt ++ "\n", args);
    std.process.exit(code);
}

fn warn(comptime fmt: []const u8, args: anytype) void {
    std.debug.print("fl-client: warning: " ++ fmt ++ "\n", args);
}

// ---------------------------------------------------------------- JSON helpers

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

/// Accepts non-negative integers written as `3` or `3.0`.
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

fn enumValue(comptime E: type, v: Value) ?E {
    return switch (v) {
        .string => |s| std.meta.stringToEnum(E, s),
        else => null,
    };
}

fn parseJson(alloc: Allocator, name: []const u8, text: []const u8) Value {
    return std.json.parseFromSliceLeaky(Value, alloc, text, .{}) catch |err|
        die(exit_bad_input, "{s} is not valid JSON ({s})", .{ name, @errorName(err) });
}

fn expectObject(name: []const u8, v: Value) std.json.ObjectMap {
    return switch (v) {
        .object => |o| o,
        else => die(exit_bad_input, "{s} must be a JSON object", .{name}),
    };
}

fn nonEmpty(s: ?[]const u8) ?[]const u8 {
    const v = s orelse return null;
    if (std.mem.trim(u8, v, " \t\r\n").len == 0) return null;
    return v;
}

// ---------------------------------------------------------------- input parsing

fn parseHyper(alloc: Allocator, text: ?[]const u8) Hyper {
    var h: Hyper = .{};
    const src = nonEmpty(text) orelse return h;
    const obj = expectObject("HYPERPARAMS", parseJson(alloc, "HYPERPARAMS", src));
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
    if (obj.get("shuffle")) |v| {
        h.shuffle = switch (v) {
            .bool => |b| b,
            else => die(exit_bad_input, "HYPERPARAMS.shuffle must be true or false", .{}),
        };
    }
    if (obj.get("mode")) |v| {
        h.mode = enumValue(Mode, v) orelse die(exit_bad_input, "HYPERPARAMS.mode must be \"standard\" or \"literal\"", .{});
    }
    if (obj.get("task")) |v| {
        h.task = enumValue(Task, v) orelse die(exit_bad_input, "HYPERPARAMS.task must be \"train\" or \"evaluate\"", .{});
    }
    // The literal mode is the original algorithm and nothing else: a proximal term would
    // make it something the reference run never was.
    if (h.mode == .literal and h.mu != 0) die(exit_bad_input, "HYPERPARAMS.mu must be 0 in \"mode\": \"literal\"", .{});
    return h;
}

fn parseDataset(alloc: Allocator, text: ?[]const u8) !Dataset {
    const src = nonEmpty(text) orelse die(exit_bad_input, "DATASET_DATA is missing or empty", .{});
    const obj = expectObject("DATASET_DATA", parseJson(alloc, "DATASET_DATA", src));
    // A k-class dataset's labels are class indices: refused by its schema, not by its labels,
    // since a non-IID part may happen to hold only classes 0 and 1.
    if (obj.get("schema")) |sv| {
        if (sv == .string and std.mem.eql(u8, sv.string, "fl-classes-dataset-v1")) die(
            exit_bad_input,
            "DATASET_DATA.schema is \"fl-classes-dataset-v1\" (k classes): this trainer learns a 2-class logistic model (schema \"fl-demo-dataset-v1\", labels 0 or 1); use a k-class trainer",
            .{},
        );
    }
    const data_v = obj.get("data") orelse die(exit_bad_input, "DATASET_DATA has no \"data\" array", .{});
    const items = switch (data_v) {
        .array => |a| a.items,
        else => die(exit_bad_input, "DATASET_DATA.data must be an array", .{}),
    };
    const n = items.len;
    if (n == 0) die(exit_bad_input, "DATASET_DATA.data is empty: nothing to train on", .{});

    var d: usize = 0;
    var x: []f64 = &.{};
    const y = try alloc.alloc(f64, n);
    for (items, 0..) |item, i| {
        const s = switch (item) {
            .object => |o| o,
            else => die(exit_bad_input, "DATASET_DATA.data[{d}] must be an object", .{i}),
        };
        const xs = switch (s.get("x") orelse die(exit_bad_input, "DATASET_DATA.data[{d}] has no \"x\"", .{i})) {
            .array => |a| a.items,
            else => die(exit_bad_input, "DATASET_DATA.data[{d}].x must be an array", .{i}),
        };
        if (i == 0) {
            d = xs.len;
            if (d == 0) die(exit_bad_input, "DATASET_DATA.data[0].x is empty", .{});
            x = try alloc.alloc(f64, n * d);
        } else if (xs.len != d) {
            die(exit_bad_input, "dimension mismatch: DATASET_DATA.data[{d}].x has {d} features, data[0].x has {d}", .{ i, xs.len, d });
        }
        for (xs, 0..) |xv, j| {
            x[i * d + j] = numberToF64(xv) orelse
                die(exit_bad_input, "DATASET_DATA.data[{d}].x[{d}] is not a finite number", .{ i, j });
        }
        const label = numberToF64(s.get("y") orelse die(exit_bad_input, "DATASET_DATA.data[{d}] has no \"y\"", .{i})) orelse
            die(exit_bad_input, "DATASET_DATA.data[{d}].y is not a number", .{i});
        if (label != 0.0 and label != 1.0) die(exit_bad_input, "DATASET_DATA.data[{d}].y must be 0 or 1", .{i});
        y[i] = label;
    }
    if (obj.get("size")) |sv| {
        const declared = numberToU64(sv);
        if (declared == null or declared.? != n) warn("DATASET_DATA.size does not match len(data)={d}; using len(data)", .{n});
    }
    return .{ .n = n, .d = d, .x = x, .y = y };
}

fn parseModel(alloc: Allocator, text: ?[]const u8, d: usize) !Model {
    const src = nonEmpty(text) orelse {
        warn("MODEL_DATA is missing; starting from a zero model of dimension {d}", .{d});
        const w = try alloc.alloc(f64, d);
        @memset(w, 0.0);
        return .{ .w = w, .b = 0.0 };
    };
    const obj = expectObject("MODEL_DATA", parseJson(alloc, "MODEL_DATA", src));
    const ws = switch (obj.get("w") orelse die(exit_bad_input, "MODEL_DATA has no \"w\"", .{})) {
        .array => |a| a.items,
        else => die(exit_bad_input, "MODEL_DATA.w must be an array", .{}),
    };
    if (ws.len != d) die(exit_bad_input, "dimension mismatch: len(MODEL_DATA.w)={d} but samples have {d} features", .{ ws.len, d });
    const w = try alloc.alloc(f64, d);
    for (ws, 0..) |v, j| {
        w[j] = numberToF64(v) orelse die(exit_bad_input, "MODEL_DATA.w[{d}] is not a finite number", .{j});
    }
    var b: f64 = 0.0;
    if (obj.get("b")) |bv| {
        b = numberToF64(bv) orelse die(exit_bad_input, "MODEL_DATA.b is not a finite number", .{});
    } else warn("MODEL_DATA has no \"b\"; using 0", .{});
    return .{ .w = w, .b = b };
}

// ---------------------------------------------------------------- model math

fn logit(w: []const f64, b: f64, x: []const f64) f64 {
    var z: f64 = 0.0;
    for (w, x) |wj, xj| z += wj * xj;
    z += b;
    return std.math.clamp(z, -z_clamp, z_clamp);
}

fn sigmoid(z: f64) f64 {
    return 1.0 / (1.0 + @exp(-z));
}

fn evaluate(m: Model, ds: Dataset) Metrics {
    var loss_sum: f64 = 0.0;
    var correct: usize = 0;
    for (0..ds.n) |i| {
        const p = sigmoid(logit(m.w, m.b, ds.row(i)));
        const pc = std.math.clamp(p, p_eps, 1.0 - p_eps);
        const y = ds.y[i];
        loss_sum += -(y * @log(pc) + (1.0 - y) * @log(1.0 - pc));
        const pred: f64 = if (p >= 0.5) 1.0 else 0.0;
        if (pred == y) correct += 1;
    }
    const n: f64 = @floatFromInt(ds.n);
    return .{ .loss = loss_sum / n, .accuracy = @as(f64, @floatFromInt(correct)) / n };
}

// ---------------------------------------------------------------- shuffling: shuffle.zig

const shuffling = @import("shuffle.zig");
const epochSeed = shuffling.epochSeed;
const shuffle = shuffling.shuffle;

// ---------------------------------------------------------------- training

fn train(alloc: Allocator, m: *Model, ds: Dataset, h: Hyper, round_id: []const u8, proplet_id: []const u8) !void {
    const order = try alloc.alloc(usize, ds.n);
    const grad = try alloc.alloc(f64, ds.d);
    // The model as received: the centre of FedProx's proximal term.
    const w_global = try alloc.dupe(f64, m.w);
    const b_global = m.b;
    const lr = h.lr;
    const mu = h.mu;
    var epoch: u64 = 0;
    while (epoch < h.epochs) : (epoch += 1) {
        if (h.mode == .literal) {
            // The original demo, step for step: data order, one SGD step per example.
            for (0..ds.n) |i| {
                const x = ds.row(i);
                const err = sigmoid(logit(m.w, m.b, x)) - ds.y[i];
                for (m.w, x) |*wj, xj| wj.* -= lr * err * xj;
                m.b -= lr * err;
            }
            continue;
        }
        if (h.shuffle) {
            shuffle(order, epochSeed(round_id, proplet_id, epoch));
        } else {
            for (order, 0..) |*o, i| o.* = i;
        }
        if (h.batch_size == 1) {
            // Per-example SGD, exactly the original demo's update rule (plus the proximal
            // gradient mu * (theta - theta_global) when mu > 0).
            for (order) |i| {
                const x = ds.row(i);
                const err = sigmoid(logit(m.w, m.b, x)) - ds.y[i];
                if (mu == 0) {
                    for (m.w, x) |*wj, xj| wj.* -= lr * err * xj;
                    m.b -= lr * err;
                } else {
                    for (m.w, x, w_global) |*wj, xj, gj| wj.* -= lr * (err * xj + mu * (wj.* - gj));
                    m.b -= lr * (err + mu * (m.b - b_global));
                }
            }
        } else {
            // Mini-batches of consecutive (shuffled) samples; the last may be short.
            // Gradient = mean over the batch, computed with the pre-batch model.
            const bs: usize = @intCast(@min(h.batch_size, @as(u64, ds.n)));
            var start: usize = 0;
            while (start < ds.n) : (start += bs) {
                const end = @min(start + bs, ds.n);
                @memset(grad, 0.0);
                var grad_b: f64 = 0.0;
                for (order[start..end]) |i| {
                    const x = ds.row(i);
                    const err = sigmoid(logit(m.w, m.b, x)) - ds.y[i];
                    for (grad, x) |*gj, xj| gj.* += err * xj;
                    grad_b += err;
                }
                const count: f64 = @floatFromInt(end - start);
                if (mu == 0) {
                    for (m.w, grad) |*wj, gj| wj.* -= lr * (gj / count);
                    m.b -= lr * (grad_b / count);
                } else {
                    for (m.w, grad, w_global) |*wj, gj, cj| wj.* -= lr * (gj / count + mu * (wj.* - cj));
                    m.b -= lr * (grad_b / count + mu * (m.b - b_global));
                }
            }
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
    const ds = try parseDataset(alloc, env.get("DATASET_DATA"));
    var model = try parseModel(alloc, env.get("MODEL_DATA"), ds.d);

    var buf: [4096]u8 = undefined;
    var fw = std.Io.File.stdout().writerStreaming(init.io, &buf);
    const w = &fw.interface;

    const before = evaluate(model, ds);
    if (hyper.task == .evaluate) {
        std.debug.print("fl-client: evaluate round={s} proplet={s} n={d} d={d} loss {d:.6} accuracy {d:.6}\n", .{
            round_id, proplet_id, ds.n, ds.d, before.loss, before.accuracy,
        });
        try std.json.Stringify.value(EvalOutput{ .num_samples = ds.n, .metrics = before }, .{}, w);
        try w.writeByte('\n');
        try w.flush();
        return;
    }
    try train(alloc, &model, ds, hyper, round_id, proplet_id);
    const after = evaluate(model, ds);

    for (model.w) |wj| {
        if (!std.math.isFinite(wj)) die(exit_bad_input, "training diverged (non-finite weight); lower lr", .{});
    }
    if (!std.math.isFinite(model.b)) die(exit_bad_input, "training diverged (non-finite bias); lower lr", .{});

    std.debug.print("fl-client: round={s} proplet={s} n={d} d={d} epochs={d} lr={d} batch_size={d} mu={d} shuffle={} mode={s} loss {d:.6} -> {d:.6}\n", .{
        round_id, proplet_id,    ds.n,                 ds.d,        hyper.epochs, hyper.lr, hyper.batch_size,
        hyper.mu, hyper.shuffle, @tagName(hyper.mode), before.loss, after.loss,
    });

    const out: Output = .{
        .round_id = round_id,
        .proplet_id = proplet_id,
        .base_model_uri = model_uri,
        .num_samples = ds.n,
        .metrics = .{
            .loss = after.loss,
            .accuracy = after.accuracy,
            .loss_before = before.loss,
            .accuracy_before = before.accuracy,
            .epochs = hyper.epochs,
        },
        .update = .{ .w = model.w, .b = model.b },
    };

    try std.json.Stringify.value(out, .{}, w);
    try w.writeByte('\n');
    try w.flush();
}
