from p2pim.cli.main import main

raise SystemExit(main())
