//! The module side of the strategy contract (../README.md, "Strategy contract"), shared by
//! the aggregation strategies written in Zig (fedavg_strategy.zig, fedmedian_strategy.zig).
//!
//! stdin is one safetensors container: `weights` (F64 [K], each update's sample count),
//! then the base model's tensors `base/<name>`, then every update's tensors
//! `update/<i>/<name>`, laid out in that order in the data section; `__metadata__` says
//! `strategy_contract` ("1"), `updates` (K) and `tensors` (the model's tensor names in order,
//! a JSON list). The header is read whole; the data section is then read front to back, one
//! tensor at a time (`Input`), so a rule that folds (FedAvg) never holds more than the model.
//! stdout is one container with the model's tensors (the base's names, dtypes and shapes)
//! and, in `__metadata__.weights`, each update's weight in the aggregate (a JSON list).

const std = @import("std");
pub const Allocator = std.mem.Allocator;
const Value = std.json.Value;

pub const exit_bad_input: u8 = 1;

/// No header this big is ever sent (the host's is names and offsets).
const max_header_bytes: u64 = 64 << 20;

pub fn die(comptime fmt: []const u8, args: anytype) noreturn {
    std.debug.print("strategy: " ++ fmt ++ "\n", args);
    std.process.exit(exit_bad_input);
}

pub const Dtype = enum {
    F32,
    F64,

    pub fn size(self: Dtype) usize {
        return switch (self) {
            .F32 => 4,
            .F64 => 8,
        };
    }
};

/// One tensor as the header declares it.
pub const Entry = struct {
    name: []const u8,
    dtype: Dtype,
    shape: []const usize,
    count: usize,
    begin: usize,
    end: usize,
};

/// Element `i` of `raw` (little-endian `dtype` values), widened to f64.
pub inline fn element(raw: []const u8, dtype: Dtype, i: usize) f64 {
    return switch (dtype) {
        .F64 => @bitCast(std.mem.readInt(u64, raw[i * 8 ..][0..8], .little)),
        .F32 => @as(f32, @bitCast(std.mem.readInt(u32, raw[i * 4 ..][0..4], .little))),
    };
}

fn jsonUsize(v: Value) ?usize {
    return switch (v) {
        .integer => |i| if (i >= 0) @intCast(i) else null,
        else => null,
    };
}

fn entryOf(alloc: Allocator, header: std.json.ObjectMap, name: []const u8) !Entry {
    const info = switch (header.get(name) orelse die("input: no tensor {s}", .{name})) {
        .object => |o| o,
        else => die("input: tensor {s}: entry is not an object", .{name}),
    };
    const dtype_name = switch (info.get("dtype") orelse die("input: tensor {s}: no dtype", .{name})) {
        .string => |s| s,
        else => die("input: tensor {s}: dtype is not a string", .{name}),
    };
    const dtype = std.meta.stringToEnum(Dtype, dtype_name) orelse
        die("input: tensor {s}: dtype {s} is not F32 or F64", .{ name, dtype_name });
    const shape_v = switch (info.get("shape") orelse die("input: tensor {s}: no shape", .{name})) {
        .array => |a| a.items,
        else => die("input: tensor {s}: shape is not an array", .{name}),
    };
    const shape = try alloc.alloc(usize, shape_v.len);
    var count: usize = 1;
    for (shape_v, shape) |sv, *s| {
        s.* = jsonUsize(sv) orelse die("input: tensor {s}: shape holds a non-integer", .{name});
        count = std.math.mul(usize, count, s.*) catch die("input: tensor {s}: shape too large", .{name});
    }
    const offs = switch (info.get("data_offsets") orelse die("input: tensor {s}: no data_offsets", .{name})) {
        .array => |a| a.items,
        else => die("input: tensor {s}: data_offsets is not an array", .{name}),
    };
    if (offs.len != 2) die("input: tensor {s}: data_offsets must be [begin, end]", .{name});
    const begin = jsonUsize(offs[0]) orelse die("input: tensor {s}: bad data_offsets", .{name});
    const end = jsonUsize(offs[1]) orelse die("input: tensor {s}: bad data_offsets", .{name});
    const nbytes = std.math.mul(usize, count, dtype.size()) catch die("input: tensor {s}: shape too large", .{name});
    if (end < begin or end - begin != nbytes) die("input: tensor {s}: data_offsets [{d}, {d}] do not hold {d} bytes", .{ name, begin, end, nbytes });
    return .{ .name = name, .dtype = dtype, .shape = shape, .count = count, .begin = begin, .end = end };
}

fn metadataString(meta: std.json.ObjectMap, key: []const u8) []const u8 {
    return switch (meta.get(key) orelse die("input: __metadata__.{s} missing", .{key})) {
        .string => |s| s,
        else => die("input: __metadata__.{s} is not a string", .{key}),
    };
}

/// The input container: its entries, and the reader positioned in its data section.
pub const Input = struct {
    /// The model's tensor names, in order.
    names: []const []const u8,
    k: usize,
    weights: Entry,
    /// The base model's tensors, in `names` order.
    base: []Entry,
    /// Update i's tensor j at `i * names.len + j`.
    updates: []Entry,
    reader: *std.Io.Reader,
    /// Bytes of the data section read so far.
    pos: usize = 0,

    pub fn update(self: Input, i: usize, j: usize) Entry {
        return self.updates[i * self.names.len + j];
    }

    fn at(self: *Input, e: Entry) void {
        if (e.begin != self.pos) die("input: tensor {s} starts at {d}, the contract puts it at {d}", .{ e.name, e.begin, self.pos });
    }

    /// Skip tensor `e` (the next in the data section).
    pub fn skip(self: *Input, e: Entry) void {
        self.at(e);
        self.reader.discardAll(e.end - e.begin) catch |err| die("input: tensor {s}: {s}", .{ e.name, @errorName(err) });
        self.pos = e.end;
    }

    /// Tensor `e` (the next in the data section) as its raw bytes.
    pub fn raw(self: *Input, alloc: Allocator, e: Entry) ![]u8 {
        self.at(e);
        const buf = try alloc.alloc(u8, e.end - e.begin);
        self.reader.readSliceAll(buf) catch |err| die("input: tensor {s}: {s}", .{ e.name, @errorName(err) });
        self.pos = e.end;
        return buf;
    }

    /// Tensor `e` (the next in the data section) widened to f64.
    pub fn values(self: *Input, alloc: Allocator, e: Entry) ![]f64 {
        const bytes = try self.raw(alloc, e);
        const out = try alloc.alloc(f64, e.count);
        for (out, 0..) |*v, i| v.* = element(bytes, e.dtype, i);
        return out;
    }

    /// sums[i] += f64(x[i]) * w for tensor `e` (the next in the data section), read in
    /// chunks: the tensor itself is never held. Lanes of a vector are separate elements, each
    /// with its own multiply and add (no fused multiply-add, no reassociation), so the sums
    /// are those of the scalar loop bit for bit.
    pub fn fold(self: *Input, e: Entry, sums: []f64, w: f64) void {
        self.at(e);
        const size = e.dtype.size();
        const chunk_elements = (1 << 15) / size;
        var done: usize = 0;
        while (done < e.count) {
            const n = @min(chunk_elements, e.count - done);
            const bytes = self.reader.take(n * size) catch |err| die("input: tensor {s}: {s}", .{ e.name, @errorName(err) });
            const out = sums[done .. done + n];
            switch (e.dtype) {
                .F64 => foldChunk(f64, bytes, out, w),
                .F32 => foldChunk(f32, bytes, out, w),
            }
            done += n;
        }
        self.pos = e.end;
    }
};

const lanes = 4;
const F64s = @Vector(lanes, f64);

fn foldChunk(comptime T: type, bytes: []const u8, out: []f64, w: f64) void {
    const size = @sizeOf(T);
    const ws: F64s = @splat(w);
    var i: usize = 0;
    while (i + lanes <= out.len) : (i += lanes) {
        const raw: [lanes * size]u8 = bytes[i * size ..][0 .. lanes * size].*;
        const xs: @Vector(lanes, T) = @bitCast(raw);
        const wide: F64s = if (T == f64) xs else @floatCast(xs);
        const acc: F64s = out[i..][0..lanes].*;
        out[i..][0..lanes].* = acc + wide * ws;
    }
    while (i < out.len) : (i += 1) {
        out[i] += element(bytes, if (T == f64) .F64 else .F32, i) * w;
    }
}

/// Read the container's header from `reader` and check it against the contract; the reader
/// is left at the start of the data section.
pub fn readInput(alloc: Allocator, reader: *std.Io.Reader) !Input {
    const len_bytes = reader.takeArray(8) catch |err| die("input: no safetensors header length ({s})", .{@errorName(err)});
    const header_len = std.mem.readInt(u64, len_bytes, .little);
    if (header_len > max_header_bytes) die("input: header of {d} bytes (at most {d})", .{ header_len, max_header_bytes });
    const text = try alloc.alloc(u8, @intCast(header_len));
    reader.readSliceAll(text) catch |err| die("input: header ends early ({s})", .{@errorName(err)});
    const parsed = std.json.parseFromSliceLeaky(Value, alloc, text, .{}) catch |err|
        die("input: safetensors header is not valid JSON ({s})", .{@errorName(err)});
    const header = switch (parsed) {
        .object => |o| o,
        else => die("input: safetensors header is not a JSON object", .{}),
    };
    const meta = switch (header.get("__metadata__") orelse die("input: no __metadata__", .{})) {
        .object => |o| o,
        else => die("input: __metadata__ is not an object", .{}),
    };
    const contract = metadataString(meta, "strategy_contract");
    if (!std.mem.eql(u8, contract, "1")) die("input: strategy_contract {s}, this module speaks 1", .{contract});
    const k = std.fmt.parseInt(usize, metadataString(meta, "updates"), 10) catch
        die("input: __metadata__.updates is not a count", .{});
    if (k == 0) die("input: no updates", .{});
    const names_v = std.json.parseFromSliceLeaky(Value, alloc, metadataString(meta, "tensors"), .{}) catch
        die("input: __metadata__.tensors is not JSON", .{});
    const names_items = switch (names_v) {
        .array => |a| a.items,
        else => die("input: __metadata__.tensors is not a list", .{}),
    };
    const names = try alloc.alloc([]const u8, names_items.len);
    for (names_items, names) |v, *n| n.* = switch (v) {
        .string => |s| s,
        else => die("input: __metadata__.tensors holds a non-string", .{}),
    };
    const weights = try entryOf(alloc, header, "weights");
    if (weights.dtype != .F64 or weights.count != k) die("input: weights must be F64 [{d}]", .{k});
    const base = try alloc.alloc(Entry, names.len);
    var name_buf: std.ArrayList(u8) = .empty;
    for (names, base) |n, *b| {
        name_buf.clearRetainingCapacity();
        try name_buf.print(alloc, "base/{s}", .{n});
        b.* = try entryOf(alloc, header, name_buf.items);
    }
    const updates = try alloc.alloc(Entry, k * names.len);
    for (0..k) |i| {
        for (names, 0..) |n, j| {
            name_buf.clearRetainingCapacity();
            try name_buf.print(alloc, "update/{d}/{s}", .{ i, n });
            const e = try entryOf(alloc, header, name_buf.items);
            if (e.count != base[j].count) die("input: tensor update/{d}/{s} has {d} elements, base/{s} {d}", .{ i, n, e.count, n, base[j].count });
            updates[i * names.len + j] = e;
        }
    }
    return .{ .names = names, .k = k, .weights = weights, .base = base, .updates = updates, .reader = reader };
}

/// Write the new model (the base's names and shapes in the updates' dtype, as the built-in
/// rules answer it; `values` in f64, narrowed) and each update's weight to `w`.
pub fn writeOutput(alloc: Allocator, w: *std.Io.Writer, in: Input, values: []const []const f64, weights: []const f64) !void {
    var header: std.Io.Writer.Allocating = .init(alloc);
    var s: std.json.Stringify = .{ .writer = &header.writer };
    try s.beginObject();
    try s.objectField("__metadata__");
    try s.beginObject();
    try s.objectField("weights");
    try s.write(try std.json.Stringify.valueAlloc(alloc, weights, .{}));
    try s.endObject();
    var offset: usize = 0;
    for (in.names, in.base, 0..) |n, b, j| {
        const dtype = in.update(0, j).dtype;
        const nbytes = b.count * dtype.size();
        try s.objectField(n);
        try s.beginObject();
        try s.objectField("dtype");
        try s.write(@tagName(dtype));
        try s.objectField("shape");
        try s.write(b.shape);
        try s.objectField("data_offsets");
        try s.write([2]usize{ offset, offset + nbytes });
        try s.endObject();
        offset += nbytes;
    }
    try s.endObject();
    // Pad the header with spaces so the data starts 8-byte aligned (as safetensors does).
    while (header.written().len % 8 != 0) try header.writer.writeByte(' ');
    const text = header.written();
    try w.writeInt(u64, text.len, .little);
    try w.writeAll(text);
    for (values, 0..) |vs, j| {
        switch (in.update(0, j).dtype) {
            .F64 => for (vs) |v| try w.writeInt(u64, @bitCast(v), .little),
            .F32 => for (vs) |v| {
                const f: f32 = @floatCast(v);
                try w.writeInt(u32, @bitCast(f), .little);
            },
        }
    }
}
