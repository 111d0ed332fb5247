from siamdiff.cli import main

raise SystemExit(main())
