/*
 * minimal.c - a deliberately small, independent propeller-fl training client.
 *
 * Written against the published contract only (env vars in, one JSON object
 * out on stdout), to show that any module honouring it runs in a proplet.
 * It does NOT use a real JSON parser: it scans MODEL_DATA / DATASET_DATA for
 * the "w", "b", "x", "y" and "lr" keys and reads the numbers with strtod.
 *
 * Algorithm: ONE pass of per-example logistic-regression SGD over the samples
 * in the order received (no shuffling, epochs ignored), lr from HYPERPARAMS
 * (default 0.01).  Reports the log-loss of the updated model.
 *
 * Build: python -m ziglang cc -target wasm32-wasi -O2 minimal.c -o minimal.wasm
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void die(int code, const char *msg) {
    fprintf(stderr, "minimal-client: %s\n", msg);
    exit(code);
}

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ':' || *p == ',') p++;
    return p;
}

/* Position just after `"key"`, or NULL. */
static const char *find_key(const char *s, const char *key) {
    size_t klen = strlen(key);
    const char *p = s;
    while ((p = strchr(p, '"')) != NULL) {
        if (strncmp(p + 1, key, klen) == 0 && p[1 + klen] == '"') return p + 2 + klen;
        p++;
    }
    return NULL;
}

/* Parse `[n, n, ...]` starting at p (after optional ':'/ws). Appends to *buf.
 * Returns the number of values, and sets *end to after the closing ']'. */
static size_t read_array(const char *p, double **buf, size_t *cap, size_t off, const char **end) {
    size_t n = 0;
    p = skip_ws(p);
    if (*p != '[') die(1, "expected a JSON array");
    p++;
    for (;;) {
        p = skip_ws(p);
        if (*p == ']') { p++; break; }
        char *q;
        double v = strtod(p, &q);
        if (q == p) die(1, "expected a number in array");
        if (off + n >= *cap) {
            *cap = *cap ? *cap * 2 : 64;
            *buf = realloc(*buf, *cap * sizeof(double));
            if (!*buf) die(1, "out of memory");
        }
        (*buf)[off + n++] = v;
        p = q;
    }
    *end = p;
    return n;
}

static double read_number(const char *p, double dflt) {
    if (!p) return dflt;
    p = skip_ws(p);
    char *q;
    double v = strtod(p, &q);
    return q == p ? dflt : v;
}

static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static double predict(const double *w, double b, const double *x, size_t d) {
    double z = b;
    for (size_t j = 0; j < d; j++) z += w[j] * x[j];
    if (z > 20.0) z = 20.0;
    if (z < -20.0) z = -20.0;
    return 1.0 / (1.0 + exp(-z));
}

int main(void) {
    const char *round_id = getenv("ROUND_ID");
    if (!round_id || !*round_id) die(2, "ROUND_ID is required");
    const char *proplet_id = getenv("PROPLET_ID");
    const char *model_uri = getenv("MODEL_URI");
    const char *hyper = getenv("HYPERPARAMS");
    const char *model = getenv("MODEL_DATA");
    const char *dataset = getenv("DATASET_DATA");
    if (!model || !dataset) die(1, "MODEL_DATA and DATASET_DATA are required");

    double lr = hyper ? read_number(find_key(hyper, "lr"), 0.01) : 0.01;

    /* model */
    double *w = NULL;
    size_t wcap = 0;
    const char *kw = find_key(model, "w");
    if (!kw) die(1, "MODEL_DATA has no w");
    const char *end;
    size_t d = read_array(kw, &w, &wcap, 0, &end);
    double b = read_number(find_key(model, "b"), 0.0);

    /* samples: every "x" array followed by its "y" */
    double *xs = NULL, *ys = NULL;
    size_t xcap = 0, ycap = 0, n = 0;
    const char *p = dataset;
    while ((p = find_key(p, "x")) != NULL) {
        size_t got = read_array(p, &xs, &xcap, n * d, &end);
        if (got != d) die(1, "feature dimension does not match len(w)");
        const char *ky = find_key(end, "y");
        if (!ky) die(1, "sample without y");
        if (n >= ycap) {
            ycap = ycap ? ycap * 2 : 64;
            ys = realloc(ys, ycap * sizeof(double));
            if (!ys) die(1, "out of memory");
        }
        ys[n++] = read_number(ky, NAN);
        if (isnan(ys[n - 1])) die(1, "y is not a number");
        p = end;
    }
    if (n == 0) die(1, "no samples");

    /* one pass of per-example SGD, data order */
    for (size_t i = 0; i < n; i++) {
        const double *x = xs + i * d;
        double err = predict(w, b, x, d) - ys[i];
        for (size_t j = 0; j < d; j++) w[j] -= lr * err * x[j];
        b -= lr * err;
    }

    double loss = 0.0;
    for (size_t i = 0; i < n; i++) {
        double q = predict(w, b, xs + i * d, d);
        if (q < 1e-12) q = 1e-12;
        if (q > 1.0 - 1e-12) q = 1.0 - 1e-12;
        loss -= ys[i] * log(q) + (1.0 - ys[i]) * log(1.0 - q);
    }
    loss /= (double)n;

    printf("{\"round_id\":");
    print_json_string(round_id);
    printf(",\"proplet_id\":");
    print_json_string(proplet_id ? proplet_id : "");
    printf(",\"base_model_uri\":");
    print_json_string(model_uri ? model_uri : "");
    printf(",\"num_samples\":%zu,\"metrics\":{\"loss\":%.17g},\"update\":{\"w\":[", n, loss);
    for (size_t j = 0; j < d; j++) printf(j ? ",%.17g" : "%.17g", w[j]);
    printf("],\"b\":%.17g}}\n", b);
    fprintf(stderr, "minimal-client: n=%zu d=%zu lr=%g loss=%g\n", n, d, lr, loss);
    return 0;
}
