//! FedAvg as a strategy module (strategy contract v1, ../README.md): the sample-weighted
//! mean sum_i(n_i * x_i) / sum_i(n_i), accumulated in f64 in update order exactly as the
//! aggregator's built-in FedAvg does (server/aggregator/fedavg.py), so the two agree to the
//! last bit. Each update is folded in as it is read: memory is the model's size, whatever K.

const std = @import("std");
const st = @import("strategy.zig");

/// The marker the aggregator looks for among the module's exports.
export fn propeller_strategy_v1() void {}

pub fn main(init: std.process.Init) !void {
    const alloc = init.arena.allocator();
    var in_buf: [1 << 16]u8 = undefined;
    var fr = std.Io.File.stdin().readerStreaming(init.io, &in_buf);
    var in = try st.readInput(alloc, &fr.interface);

    const samples = try in.values(alloc, in.weights);
    var total: f64 = 0;
    for (samples) |n| {
        if (!(n > 0)) st.die("input: weights must be > 0", .{});
        total += n;
    }
    for (in.base) |b| in.skip(b);
    const sums = try alloc.alloc([]f64, in.names.len);
    for (sums, in.base) |*s, b| {
        s.* = try alloc.alloc(f64, b.count);
        @memset(s.*, 0);
    }
    for (0..in.k) |i| {
        for (sums, 0..) |s, j| in.fold(in.update(i, j), s, samples[i]);
    }
    for (sums) |s| {
        for (s) |*v| v.* /= total;
    }
    const weights = try alloc.alloc(f64, in.k);
    for (weights, samples) |*w, n| w.* = n / total;

    var out_buf: [1 << 16]u8 = undefined;
    var fw = std.Io.File.stdout().writerStreaming(init.io, &out_buf);
    try st.writeOutput(alloc, &fw.interface, in, sums, weights);
    try fw.interface.flush();
}
