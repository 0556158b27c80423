from ouvert.cli import main

raise SystemExit(main())
