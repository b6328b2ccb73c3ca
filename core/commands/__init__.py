"""The `shardvision` command line: cli.py parses the subcommand and hands the rest of the line to
its module here (plan, submit, report, export, shard), or, for train, eval and check-data, to the recipe
through core/entry.py."""
