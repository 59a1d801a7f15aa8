"""`propeller-fl console`: a local, read-only web page showing the fleet live.

The page's server is a gRPC client of the manager and the coordinator (the CLI's `Client`,
as an operator when mutual TLS is on); the services stay gRPC. `board.Board` is the console's
picture (proplets, experiments, rounds) and tells each open page what changed;
`feeds.Feeds` keeps it current from WatchExperiment / WatchRound streams and periodic
ListProplets / ListExperiments; `web.WebServer` serves the page, its script and style, the
picture as JSON and the changes as server-sent events; `app.Console` opens them together.
docs/console.md says what the page shows and how to run it.
"""
